"""One of the head's other API processes (serve.api_servers = N > 1): `python -m eep_hpc.serve.api_process`,
started and stopped by the head (api_servers.py) through its stdin: the ApiLaunch (length-prefixed msgpack), then
nothing until the head closes the pipe, or dies.

It serves the same app on the head's port (SO_REUSEPORT: the kernel spreads connections over the N processes),
streams its requests' tokens straight from the ranks (remote_engine.py), passes /admin/* and /metrics on to the
head (api_proxy.py), and writes its metrics where the head sums them. End of its stdin stops it gracefully; SIGINT
and SIGTERM are the head's to handle (Ctrl-C reaches the whole process group, scancel every process of the job):
the head drains first, ending this process's requests through the coordinator, then closes the pipe.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

import msgspec

from eep_hpc import protocol as P
from eep_hpc import signing
from eep_hpc.logs import setup_logging

log = logging.getLogger("eep_hpc.api")

CLOSE_CONNECTIONS_S = 3.0


async def serve(launch: P.ApiLaunch) -> None:
    from eep_hpc.model.tokenizer import Tokenizer
    from eep_hpc.gc_heap import freeze_startup_heap, warn_on_long_pauses
    from eep_hpc.serve.api_proxy import ToHeadMiddleware
    from eep_hpc.serve.app import create_app
    from eep_hpc.serve.remote_engine import RemoteEngine
    from eep_hpc.serve.server import ApiServer

    engine = RemoteEngine(launch, Tokenizer.from_dir(launch.tokenizer_dir))
    engine.open_sockets()
    app = create_app(engine, launch.config.serve)
    app.add_middleware(ToHeadMiddleware, head_url=launch.admin_url)
    cfg = msgspec.structs.replace(launch.config.serve, port=launch.port)
    server = ApiServer(app, cfg, graceful_timeout_s=CLOSE_CONNECTIONS_S, log_level="warning", reuse_port=True,
                       join_port=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin.fileno(), lambda: os.read(sys.stdin.fileno(), 4096) or stop.set())  # EOF: stop
    receiving = asyncio.create_task(engine.run())
    try:
        # join the port only once the head says the service is ready: the kernel hands connections to every
        # process listening on it, and one that had not heard ApiReady yet answered 503 to requests the head took
        while not engine.ready():
            if stop.is_set():
                return
            if receiving.done():
                receiving.result()  # raises what ended it
            await asyncio.sleep(0.02)
        freeze_startup_heap(f"API process {launch.api}")  # before it takes requests: theirs stay collectable
        warn_on_long_pauses(f"API process {launch.api}")
        await server.start()
        log.info("API process %d serving on port %d", launch.api, launch.port)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            if receiving.done():
                receiving.result()  # raises what ended it
        loop.remove_reader(sys.stdin.fileno())
        await server.stop()
    finally:
        receiving.cancel()
        await asyncio.gather(receiving, return_exceptions=True)
        engine.close()


def read_launch(stream) -> P.ApiLaunch:
    size = int.from_bytes(stream.read(8), "big")
    return msgspec.msgpack.decode(stream.read(size), type=P.ApiLaunch)


def main() -> int:
    for sig in (signal.SIGINT, signal.SIGTERM):  # the head's to handle: it drains, then closes our stdin
        signal.signal(sig, signal.SIG_IGN)
    launch = read_launch(sys.stdin.buffer)
    setup_logging(f"%(asctime)s api{launch.api} %(levelname)s %(message)s")
    signing.use_secret(signing.read_secret(launch.config.control.secret_file))
    from eep_hpc.serve.metrics import use_multiprocess_files

    use_multiprocess_files(launch.metrics_dir)
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve(launch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
