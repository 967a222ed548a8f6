"""uvicorn inside the head's event loop, started and stopped by the head.

The server binds its socket itself (port 0 = a free port, reported as `port`/`url`), installs no signal handlers
(signals belong to the head), and stops gracefully: it stops accepting connections, lets in-flight requests and
streams run to their end for up to `graceful_timeout_s`, then cancels what is left (which aborts those engine
requests; their clients see the connection close). For streams to end cleanly sooner, the engine can finish its
in-flight requests with finish_reason "abort" first: each stream then sends its last chunk and [DONE].
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any, Iterator

import uvicorn
from fastapi import FastAPI

from eep_hpc.config import ServeConfig

logger = logging.getLogger(__name__)


class _Uvicorn(uvicorn.Server):
    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.started_event = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the head owns SIGINT/SIGTERM and calls ApiServer.stop()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        self.started_event.set()


def bind_socket(host: str, port: int, reuse_port: bool = False, join: bool = False) -> socket.socket:
    """reuse_port: several processes serve this port, each its own socket (SO_REUSEPORT: the kernel spreads the
    connections over them), as the head's API processes do (serve.api_servers > 1). The first (join=False) checks
    the port is free by binding it plainly first: SO_REUSEPORT alone would let it share the port of another head of
    the same user. join=True: the port is the first one's."""
    sock = None
    try:
        family, type_, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        if reuse_port and not join:
            with socket.socket(family, type_, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(addr)
                addr = probe.getsockname()  # port 0: the free port found, shared from here on
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise OSError(f"cannot listen on {host}:{port} (serve.host, serve.port): {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock


class ApiServer:
    def __init__(
        self,
        app: FastAPI,
        cfg: ServeConfig,
        *,
        graceful_timeout_s: float = 30.0,
        log_level: str = "info",
        access_log: bool = False,
        reuse_port: bool = False,
        join_port: bool = False,
    ) -> None:
        self.app, self.cfg = app, cfg
        self.reuse_port, self.join_port = reuse_port, join_port
        self.private_url = ""  # set by bind_private()
        self._private: socket.socket | None = None
        self.graceful_timeout_s = graceful_timeout_s
        self.log_level, self.access_log = log_level, access_log
        self.port: int | None = None
        self._sock: socket.socket | None = None
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = self.cfg.host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostname()
        elif ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    def bind(self) -> int:
        """Bind the listening socket now, so that a busy port fails before anything else starts (OSError); start()
        serves on it. Until then connections are refused. Returns the port."""
        if self._sock is None:
            self._sock = bind_socket(self.cfg.host, self.cfg.port, self.reuse_port, self.join_port)
            self.port = self._sock.getsockname()[1]
        return self.port

    def bind_private(self) -> str:
        """A second listener on 127.0.0.1 (a free port) for this host's own processes: the head's other API
        processes pass /admin/* and /metrics on to it. -> its URL."""
        if self._private is None:
            self._private = bind_socket("127.0.0.1", 0)
            self.private_url = f"http://127.0.0.1:{self._private.getsockname()[1]}"
        return self.private_url

    async def start(self) -> str:
        """Bind (unless bind() did), serve in the background, return once accepting connections; returns the URL."""
        self.bind()
        sock = self._sock
        config = uvicorn.Config(
            self.app,
            log_config=None,  # the head's logging config applies
            log_level=self.log_level,
            access_log=self.access_log,
            lifespan="off",
            timeout_graceful_shutdown=self.graceful_timeout_s,
        )
        if self.access_log:  # uvicorn set its access logger to log_level too; its lines are INFO
            logging.getLogger("uvicorn.access").setLevel(logging.INFO)
        self._server = _Uvicorn(config)
        sockets = [sock] if self._private is None else [sock, self._private]
        self._task = asyncio.create_task(self._server.serve(sockets=sockets), name="eep-hpc-api")
        started = asyncio.ensure_future(self._server.started_event.wait())
        await asyncio.wait([started, self._task], return_when=asyncio.FIRST_COMPLETED)
        if not started.done():
            started.cancel()
            sock.close()
            exc = None if self._task.cancelled() else self._task.exception()
            raise RuntimeError(f"the API server failed to start on {self.cfg.host}:{self.port}") from exc
        logger.info("API server listening on %s", self.url)
        return self.url

    async def wait(self) -> None:
        """Until the server has stopped."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def stop(self) -> None:
        """Graceful stop; returns once every connection is closed."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._task
        # Past the grace period uvicorn cancels the request tasks without waiting for them; wait here, so that
        # their engine requests are aborted by the time stop() returns.
        left = list(self._server.server_state.tasks)
        if left:
            await asyncio.wait(left, timeout=10.0)


async def run_server(
    app: FastAPI,
    cfg: ServeConfig,
    ready_event: asyncio.Event | None = None,
    **options: Any,
) -> None:
    """Serve `app` on cfg.host:cfg.port until cancelled (then stop gracefully). Once listening, the URL and port
    are on `app.state.url` / `app.state.port` and `ready_event` is set. `options` go to ApiServer."""
    server = ApiServer(app, cfg, **options)
    await server.start()
    app.state.url, app.state.port, app.state.server = server.url, server.port, server
    if ready_event is not None:
        ready_event.set()
    try:
        await server.wait()
    finally:
        await asyncio.shield(server.stop())
