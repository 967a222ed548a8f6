"""The head's other API processes (serve.api_servers = N > 1): started before the ranks (their sockets go into
every RankLaunch), stopped after the head's own server. Each gets its ApiLaunch on its stdin, which the head keeps
open: closing it stops the process gracefully, and it closes by itself when the head dies, however it dies."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Callable

import msgspec
from prometheus_client import multiprocess

from eep_hpc import protocol as P

log = logging.getLogger("eep_hpc.head")


class ApiProcesses:
    def __init__(self, launches: list[P.ApiLaunch]):
        self.launches = launches
        self.procs: list[subprocess.Popen] = []

    def start(self) -> None:
        for launch in self.launches:
            proc = subprocess.Popen([sys.executable, "-m", "eep_hpc.serve.api_process"], stdin=subprocess.PIPE)
            data = msgspec.msgpack.encode(launch)
            proc.stdin.write(len(data).to_bytes(8, "big") + data)
            proc.stdin.flush()
            self.procs.append(proc)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def check(self) -> None:
        """Raises RuntimeError if one of them exited."""
        for launch, proc in zip(self.launches, self.procs):
            if proc.poll() is not None:
                raise RuntimeError(f"API process {launch.api} exited with code {proc.returncode}")

    async def watch(self, on_exit: Callable[[int, int], None], period_s: float = 0.5) -> None:
        """Until cancelled (before stop()): on_exit(api index, exit code) once for each that exits."""
        reported: set[int] = set()
        while True:
            for launch, proc in zip(self.launches, self.procs):
                if launch.api not in reported and proc.poll() is not None:
                    reported.add(launch.api)
                    on_exit(launch.api, proc.returncode)
            await asyncio.sleep(period_s)

    def stop(self, timeout_s: float = 10.0) -> None:
        for proc in self.procs:
            proc.stdin.close()
        for launch, proc in zip(self.launches, self.procs):
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("API process %d did not stop in %g s: killed", launch.api, timeout_s)
                proc.kill()
                proc.wait()
            multiprocess.mark_process_dead(proc.pid, launch.metrics_dir)
