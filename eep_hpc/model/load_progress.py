"""Progress of loading weights into a model, by tensor group (the dense weights, then the experts of a few MoE layers
at a time), with bytes and rate: a tqdm bar on a terminal; otherwise (a rank's log file, a Slurm job's output) one
log line per group, never a carriage return."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

from tqdm import tqdm

log = logging.getLogger("eep_hpc.load")

EXPERT_GROUPS = 8  # a model's expert layers are reported in about this many groups


@dataclass
class LoadedGroup:
    name: str
    bytes: int
    seconds: float

    def line(self) -> str:
        rate = self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0
        return f"{self.name}: {self.bytes / 2**20:,.1f} MiB in {self.seconds:.2f} s ({rate:.2f} GB/s)"


class LoadProgress:
    def __init__(self, total_bytes: int, what: str, stream=None) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.groups: list[LoadedGroup] = []
        self._group_bytes = 0
        self.start = time.perf_counter()
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=total_bytes, desc=what, unit="B", unit_scale=True, unit_divisor=1024,
                        file=self.stream, leave=True, dynamic_ncols=True) if tty else None

    def add(self, nbytes: int) -> None:
        self._group_bytes += nbytes
        if self.bar is not None:
            self.bar.update(nbytes)

    @contextmanager
    def group(self, name: str):
        self._group_bytes, start = 0, time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(name, refresh=False)
        yield
        done = LoadedGroup(name, self._group_bytes, time.perf_counter() - start)
        self.groups.append(done)
        if self.bar is None:
            log.info("%s, %s", self.what, done.line())

    def close(self) -> LoadedGroup:
        total = LoadedGroup(f"{self.what} done", sum(g.bytes for g in self.groups), time.perf_counter() - self.start)
        if self.bar is not None:
            self.bar.close()
        if self.groups:  # nothing loaded (a joiner that gets its weights from peers): nothing to say
            log.info("%s", total.line())
        return total


def layer_groups(num_layers: int) -> list[range]:
    """MoE layer indices in about EXPERT_GROUPS consecutive runs."""
    size = max(1, -(-num_layers // EXPERT_GROUPS))
    return [range(i, min(i + size, num_layers)) for i in range(0, num_layers, size)]
