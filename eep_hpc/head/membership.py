"""Membership of the serving group as the coordinator sees it: each rank's state and last report."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto, unique

from eep_hpc import protocol as P
from eep_hpc.cluster.launcher import RankJob


@unique
class RankState(Enum):
    LAUNCHED = auto()  # job submitted, no hello yet
    CONNECTED = auto()  # said hello, not in an epoch yet
    READY = auto()  # member of the current epoch, serving
    DRAINING = auto()  # member until the next commit; gets no new requests
    FAILED = auto()
    EXITED = auto()


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
    """Expert slots of each rank: at least num_experts + redundant in all, shared in proportion to capacity
    (equal capacities: the same count each, rounded up)."""
    total = num_experts + redundant
    scale = total / sum(capacities)
    slots = [max(1, -(-int(round(c * scale * 1000)) // 1000)) for c in capacities]  # ceil, robust to float dust
    while sum(slots) < total:  # rounding left some short: the rank furthest under its share gets one more
        i = max(range(len(slots)), key=lambda j: capacities[j] * scale - slots[j])
        slots[i] += 1
    return slots
