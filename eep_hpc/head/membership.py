"""Membership of the serving group as the head sees it: each rank's record (state, last report), the members of the
serving epoch in epoch-rank order with their expert placement, and a way to wait for any of it to change.

`Membership` owns these; the other parts of the head read them and change a rank's state where they own that
transition (health.py: FAILED; epoch_exchange.py: READY, DRAINING, EXITED at a commit; jobs.py: EXITED when a job is
cancelled or discarded). Whoever changes something calls `changed()`, which wakes every `wait_for`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from enum import Enum, auto, unique

from eep_hpc import protocol as P
from eep_hpc.cluster.launcher import RankJob
from eep_hpc.parallel.eplb import Placement


@unique
class RankState(Enum):
    LAUNCHED = auto()  # job submitted, no hello yet
    CONNECTED = auto()  # said hello, not in an epoch yet
    READY = auto()  # member of the current epoch, serving
    DRAINING = auto()  # member until the next commit; gets no new requests
    FAILED = auto()
    EXITED = auto()


GONE = (RankState.FAILED, RankState.EXITED)


@dataclass
class RankRecord:
    rank_id: int
    job: RankJob
    state: RankState = RankState.LAUNCHED
    host: str = ""
    pid: int = 0
    device: str = ""
    stats: P.RankStats = field(default_factory=P.RankStats)
    last_seen: float = field(default_factory=time.monotonic)
    in_flight: set[str] = field(default_factory=set)
    num_kv_blocks: int = 0
    nixl: bool = False
    started: float = field(default_factory=time.monotonic)
    capacity: float = 1.0  # relative expert-slot capacity (its pool's expert_capacity)


class StartupError(RuntimeError):
    pass


def is_pending(job) -> bool:
    return bool(getattr(job, "pending", lambda: False)())


def slots_per_rank(num_experts: int, redundant: int, capacities: list[float]) -> list[int]:
    """Expert slots of each rank: num_experts + redundant in all, whatever the number of ranks, shared in proportion
    to capacity (largest remainders; equal capacities differ by one slot at most). A fixed total keeps the expert
    tables' shapes across grows and shrinks, so CUDA graphs that read them can be kept (model/moe.py
    `ExpertParallel.can_replace`). Every rank gets one slot at least: only more ranks than slots exceed the total."""
    total = num_experts + redundant
    shares = [c * total / sum(capacities) for c in capacities]
    slots = [max(1, int(s + 1e-9)) for s in shares]  # floors, robust to float dust
    while sum(slots) < total:  # the rank furthest under its share gets one more
        i = max(range(len(slots)), key=lambda j: (shares[j] - slots[j], -j))
        slots[i] += 1
    while sum(slots) > total and max(slots) > 1:  # raised to one slot: the rank furthest over its share gives one
        i = max((j for j in range(len(slots)) if slots[j] > 1), key=lambda j: (slots[j] - shares[j], j))
        slots[i] -= 1
    return slots


class Membership:
    def __init__(self, jobs_dir: str):
        self.ranks: dict[int, RankRecord] = {}
        self.members: list[int] = []  # rank ids of the serving epoch, in epoch-rank order
        self.epoch = -1  # the epoch serving now
        self.last_epoch_number = -1  # the highest epoch number handed out (prepared and rolled-back ones included)
        self.placement: Placement | None = None
        self.recovering = False  # members were lost and the survivors re-form; new requests wait
        self._jobs_dir = jobs_dir  # where a failed rank's log is, for errors
        self._changed = asyncio.Event()

    def next_epoch_number(self) -> int:
        """A new epoch number; one that was rolled back is never reused, so its store prefixes stay unique."""
        self.last_epoch_number += 1
        return self.last_epoch_number

    def commit(self, epoch: int, members: list[int], placement: Placement) -> None:
        self.epoch, self.members, self.placement = epoch, list(members), placement

    def ready(self) -> list[RankRecord]:
        """Members that take requests, in epoch order."""
        return [self.ranks[r] for r in self.members if self.ranks[r].state == RankState.READY]

    def live(self) -> list[RankRecord]:
        return [rec for rec in self.ranks.values() if rec.state not in GONE]

    def lost(self) -> list[int]:
        """Members whose process is gone."""
        return [r for r in self.members if self.ranks[r].state in GONE]

    def changed(self) -> None:
        self._changed.set()

    async def wait_for(self, cond, timeout_s: float, what: str, watch: list[int] | None = None,
                       raise_on_failed: bool = True, since=None) -> None:
        """Until cond() holds; StartupError when a watched rank (all by default) failed, or on timeout: timeout_s
        from now, or from `since()` (a monotonic time, e.g. of the latest progress) when that is later."""
        start = time.monotonic()
        while not cond():
            deadline = max(start, since() if since is not None else 0.0) + timeout_s
            watched = self.ranks.values() if watch is None else [self.ranks[r] for r in watch]
            failed = [r.rank_id for r in watched if r.state == RankState.FAILED]
            if failed and raise_on_failed:
                raise StartupError(f"rank(s) {failed} failed while waiting for {what}; see {self._jobs_dir}")
            left = deadline - time.monotonic()
            if left <= 0:
                quiet = " with no progress" if since is not None and deadline > start + timeout_s else ""
                raise StartupError(f"timed out after {timeout_s:.0f} s{quiet} waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass
