"""The head process: coordinator + HTTP API in one event loop (what `eep-hpc serve` and sbatch/head.sh run).

With serve.api_servers = N > 1 the head starts N - 1 more API processes on its port before the ranks
(serve/api_servers.py); they stream their requests' tokens straight from the ranks and ask this coordinator for
everything else (head/api_link.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from pathlib import Path

import msgspec

from eep_hpc import protocol as P
from eep_hpc.cluster import discovery
from eep_hpc.cluster.local import LocalLauncher
from eep_hpc.config import TINY_MODEL, Config
from eep_hpc.engine.rank_engine import max_model_len
from eep_hpc.head.api_link import ApiLink
from eep_hpc.head.coordinator import Coordinator
from eep_hpc.head.credentials import make_credentials, rank_config, serve_config
from eep_hpc.model.arch import load_arch
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.model.tokenizer import Tokenizer
from eep_hpc.serve.admin import add_admin_routes
from eep_hpc.serve.api_servers import ApiProcesses
from eep_hpc.serve.app import create_app
from eep_hpc.serve.metrics import use_multiprocess_files
from eep_hpc.serve.server import ApiServer

log = logging.getLogger("eep_hpc.head")

SHUTTING_DOWN = "The server is shutting down."
# After the grace period every response has had its last event; uvicorn gets this long to see them out.
CLOSE_CONNECTIONS_S = 3.0


class StartupError(Exception):
    """A mistake found before anything starts (the model path, a busy port): one line for the user."""


def resolve_model_dir(cfg: Config) -> Path:
    if cfg.model.path == TINY_MODEL:
        return ensure_tiny_checkpoint()
    path = Path(cfg.model.path).expanduser().resolve()
    if not path.is_dir():
        raise StartupError(f"model path {path} does not exist (model.path / --model: a Hugging Face-format "
                           "directory, or 'tiny')")
    if not (path / "config.json").is_file():
        raise StartupError(f"model path {path} has no config.json (expected a Hugging Face-format directory)")
    if cfg.model.load_format == "auto" and not any(path.glob("*.safetensors")):
        raise StartupError(f"model path {path} has no *.safetensors weights (model.load_format = \"dummy\" "
                           "serves random weights of its shape)")
    return path


def read_arch(model_dir: Path):
    try:
        return load_arch(model_dir)
    except (ValueError, KeyError, TypeError) as e:  # bad JSON, a missing key, an unsupported architecture
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e).splitlines()[0]
        raise StartupError(f"model path {model_dir}: config.json: {what}") from None


def tokenizer_dir(cfg: Config, model_dir: Path) -> Path:
    if (model_dir / "tokenizer.json").is_file():
        return model_dir
    if cfg.model.load_format == "dummy":  # a bare config.json: a placeholder vocabulary of the same size
        from eep_hpc.model.placeholder_vocab import write_placeholder_tokenizer

        return write_placeholder_tokenizer(model_dir, Path(cfg.control.run_dir) / "placeholder-tokenizer")
    raise StartupError(f"model path {model_dir} has no tokenizer.json")


def build_coordinator(cfg: Config, launcher=None) -> Coordinator:
    model_dir = resolve_model_dir(cfg)
    arch = read_arch(model_dir)
    tokenizer = Tokenizer.from_dir(tokenizer_dir(cfg, model_dir))
    eos = list(dict.fromkeys([*tokenizer.eos_token_ids, *arch.eos_token_ids]))
    if launcher is None and cfg.parallel.launcher == "slurm":
        from eep_hpc.cluster.slurm import SlurmLauncher

        launcher = SlurmLauncher(cfg.control.run_dir, cfg.pools, default_pool=cfg.parallel.pool,
                                 device=cfg.parallel.device)
    launcher = launcher or LocalLauncher(cfg.control.run_dir, cfg.parallel.device)
    return Coordinator(cfg, launcher, str(model_dir), eos, arch.num_experts, len(arch.moe_layers),
                       model_name=cfg.model.served_name(), max_model_len=max_model_len(cfg, arch), tokenizer=tokenizer,
                       vocab_size=arch.vocab_size)


class Head:
    """The head's composition root: credentials, the coordinator, and the HTTP API with the admin routes and
    metrics over it."""

    def __init__(self, cfg: Config, launcher=None):
        """Raises StartupError for a busy port or an unusable model, before any rank starts."""
        self.cfg = cfg  # as loaded; never changed
        creds = make_credentials(cfg)
        self.api_key_file, self.admin_token_file, self.secret_file = (creds.api_key_file, creds.admin_token_file,
                                                                      creds.secret_file)
        if self.api_key_file:
            log.info("API key required on /v1/*: 'Authorization: Bearer <key>' with the key in %s", self.api_key_file)
        if self.admin_token_file:
            log.info("admin token required on /admin/*: 'Authorization: Bearer <token>' with the token in %s "
                     "(eep-hpc status/grow/shrink --run-dir %s find it)", self.admin_token_file, cfg.control.run_dir)
        ranks_cfg = rank_config(cfg, creds)
        self.coordinator = build_coordinator(ranks_cfg, launcher)
        more_apis = cfg.serve.api_servers - 1
        metrics_dir = Path(cfg.control.run_dir) / "api-metrics"
        if more_apis:  # before the app's metrics exist: every API process writes them where /metrics sums them
            use_multiprocess_files(metrics_dir, fresh=True)
        self.app = create_app(self.coordinator, serve_config(cfg, creds))
        self.server = ApiServer(self.app, cfg.serve, graceful_timeout_s=CLOSE_CONNECTIONS_S, log_level="warning",
                                reuse_port=more_apis > 0)
        try:
            self.server.bind()
        except OSError as e:
            raise StartupError(str(e)) from None
        add_admin_routes(self.app, self.coordinator.admin)
        self.app.state.metrics.exposed.register(self.coordinator.metrics)
        self.api_link: ApiLink | None = None
        self.api_processes: ApiProcesses | None = None
        if more_apis:
            self.api_link = ApiLink(cfg.control.host, more_apis)
            self._api_launch = dict(
                config=msgspec.structs.replace(ranks_cfg, serve=serve_config(cfg, creds)), port=self.server.port,
                admin_url=self.server.bind_private(), model_name=self.coordinator.model_name,
                max_model_len=self.coordinator.max_model_len, vocab_size=self.coordinator.vocab_size,
                tokenizer_dir=str(tokenizer_dir(cfg, resolve_model_dir(cfg))), metrics_dir=str(metrics_dir))
        self.url = ""
        self._stop = asyncio.Event()
        self._grace_over = asyncio.Event()

    def request_stop(self) -> None:
        """Stop draining: new requests get a 503 at once (the coordinator is no longer ready), those in flight
        have serve.shutdown_grace_s to finish. A second call (Ctrl-C again) ends the grace period at once."""
        if self._stop.is_set():
            self._grace_over.set()
            return
        self.coordinator.begin_stop()
        self._stop.set()

    async def _drain(self) -> None:
        """Wait up to the grace period for the requests in flight; then end those still open with a 503 (an error
        event and [DONE] on a stream)."""
        streams, grace = self.coordinator.streams, self.cfg.serve.shutdown_grace_s
        if len(streams):
            log.info("stopping: %d request(s) in flight have %g s to finish; new requests get 503", len(streams),
                     grace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while len(streams) and loop.time() < deadline and not self._grace_over.is_set():
            await asyncio.sleep(0.05)
        if len(streams):
            log.info("stopping: %d request(s) still open end with a 503 (%s)", len(streams), SHUTTING_DOWN)
            streams.end_all("abort", SHUTTING_DOWN)

    async def run(self, on_ready=None) -> None:
        """Start ranks, serve HTTP until request_stop() (or SIGINT/SIGTERM), then shut everything down."""
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (ValueError, RuntimeError):  # not the main thread (tests run heads in threads)
                pass
        server = self.server
        try:
            if self.api_link is not None:
                await self._start_api_processes()
            await self.coordinator.start(cfg.parallel.ranks)
            self.url = await server.start()
            discovery.write(cfg.control.run_dir, discovery.HeadInfo(
                api_url=self.url, coordinator=self.coordinator.address, pid=os.getpid(),
                host=socket.gethostname(), model=self.coordinator.model_name,
                admin_token_file=str(self.admin_token_file or ""), api_key_file=str(self.api_key_file or "")))
            if on_ready is not None:
                on_ready(self)
            await self._stop.wait()
            await self._drain()
            await server.stop()
        finally:
            discovery.remove(cfg.control.run_dir)
            await self.coordinator.stop()
            if self.api_processes is not None:
                await asyncio.to_thread(self.api_processes.stop)
                self.api_link.close()

    def _api_process_exited(self, api: int, code: int) -> None:
        """Its clients lost their connections with it; the others and the head serve on (the kernel gives new
        connections to the listeners left). It is not restarted: the ranks were told its socket at their launch."""
        aborted = self.coordinator.streams.drop_api(api)
        log.error("API process %d exited with code %d: its %d request(s) aborted; the others serve on", api, code,
                  aborted)

    async def _start_api_processes(self, timeout_s: float = 120.0) -> None:
        """The other API processes, before any rank: each rank is launched with their sockets."""
        link, coordinator = self.api_link, self.coordinator
        link.open()
        coordinator.streams.to_api = link.send
        coordinator.spawn(link.receive(coordinator.streams.submit, coordinator.streams.cancel))
        self.api_processes = ApiProcesses([P.ApiLaunch(api=i, head_address=link.address, **self._api_launch)
                                           for i in range(1, link.count + 1)])
        self.api_processes.start()
        waiting = asyncio.ensure_future(link.wait_for_hellos(timeout_s))
        while not waiting.done():  # an API process that exits at start ends the head's start too
            await asyncio.wait([waiting], timeout=0.2)
            if not waiting.done():
                try:
                    self.api_processes.check()
                except RuntimeError:
                    waiting.cancel()
                    raise
        coordinator.link.api_addresses = waiting.result()
        coordinator.spawn(link.watch_ready(coordinator.ready))
        coordinator.spawn(self.api_processes.watch(self._api_process_exited))
        log.info("%d more API process(es) on port %d: pids %s", link.count, self.server.port,
                 self.api_processes.pids())
