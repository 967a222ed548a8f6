"""Adaptive scaling (like dask-jobqueue's adapt, with its job lifetime): grow while load stays high, shrink ranks
that stay idle, replace ranks before their lifetime (walltime) ends, never below `min_ranks` or above `max_ranks`.

`decide` is a pure function of the policy and what the head observed; `Autoscaler` keeps the policy in force (the
configured [adapt] table until `eep-hpc adapt` replaces it) and the little history it needs (how long pressure or
idleness has lasted), and grows or shrinks through scaling.py, one event at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from eep_hpc.config import AdaptConfig
from eep_hpc.head.membership import Membership
from eep_hpc.head.scaling import Scaling
from eep_hpc.head.streams import Streams

log = logging.getLogger("eep_hpc.adapt")


@dataclass
class RankLoad:
    rank_id: int
    age_s: float
    num_running: int
    num_waiting: int
    kv_usage: float  # 0..1


@dataclass
class Decision:
    grow: int = 0
    shrink: list[int] | None = None
    why: str = ""


def decide(cfg: AdaptConfig, ranks: list[RankLoad], pressure_for_s: float, idle_for_s: float) -> Decision:
    """ranks: members in epoch order (newest last); pressure_for_s / idle_for_s: how long each has lasted."""
    n = len(ranks)
    if n < cfg.min_ranks:
        return Decision(grow=cfg.min_ranks - n, why=f"{n} rank(s) < min {cfg.min_ranks}")
    if cfg.lifetime_s > 0:
        old = [r for r in ranks if r.age_s > cfg.lifetime_s - cfg.replace_before_s]
        if old:
            if n - 1 < cfg.min_ranks:  # its replacement first (may pass max by one, briefly)
                return Decision(grow=1, why=f"rank {old[0].rank_id} nears its lifetime: starting a replacement")
            return Decision(shrink=[old[0].rank_id], why=f"rank {old[0].rank_id} nears its lifetime")
    if n > cfg.max_ranks:
        return Decision(shrink=[r.rank_id for r in ranks[cfg.max_ranks:]], why=f"{n} rank(s) > max {cfg.max_ranks}")
    if pressure_for_s >= cfg.sustain_s and n < cfg.max_ranks:
        return Decision(grow=1, why=f"load high for {pressure_for_s:.0f} s")
    if idle_for_s >= cfg.idle_s and n > cfg.min_ranks:
        return Decision(shrink=[ranks[-1].rank_id], why=f"idle for {idle_for_s:.0f} s")
    return Decision()


def under_pressure(cfg: AdaptConfig, ranks: list[RankLoad]) -> bool:
    if not ranks:
        return False
    waiting = sum(r.num_waiting for r in ranks) / len(ranks)
    return waiting > cfg.queue_high or max(r.kv_usage for r in ranks) > cfg.kv_high


def idle(ranks: list[RankLoad]) -> bool:
    return all(r.num_running == 0 and r.num_waiting == 0 for r in ranks)


class Autoscaler:
    def __init__(self, policy: AdaptConfig, membership: Membership, scaling: Scaling, streams: Streams,
                 ready: Callable[[], bool]):
        """ready(): the head serves and is not going down."""
        self.policy = policy  # replaced whole by adjust(); the config it came from is never changed
        self.membership, self.scaling, self.streams, self.ready = membership, scaling, streams, ready
        self._pressure_since: float | None = None
        self._idle_since: float | None = None
        self.last: Decision = Decision()

    def adjust(self, **changes) -> None:
        """A new policy: these fields changed (e.g. enabled, min_ranks, max_ranks from `eep-hpc adapt`)."""
        self.policy = msgspec.structs.replace(self.policy, **changes)

    def state(self) -> dict:
        p = self.policy
        return {"enabled": p.enabled, "min_ranks": p.min_ranks, "max_ranks": p.max_ranks, "last": self.last.why}

    def observe(self, now: float) -> list[RankLoad]:
        m = self.membership
        ranks = []
        for rid in m.members:
            rec = m.ranks[rid]
            s = rec.stats
            ranks.append(RankLoad(rid, now - rec.started, s.num_running, s.num_waiting,
                                  s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0))
        return ranks

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval_s)
            policy = self.policy
            if not policy.enabled or self.scaling.busy() or not self.ready():
                continue
            now = time.monotonic()
            ranks = self.observe(now)
            self._pressure_since = (self._pressure_since or now) if under_pressure(policy, ranks) else None
            busy_streams = len(self.streams.open) > 0
            self._idle_since = (self._idle_since or now) if idle(ranks) and not busy_streams else None
            d = decide(policy, ranks, now - (self._pressure_since or now), now - (self._idle_since or now))
            self.last = d
            if not (d.grow or d.shrink):
                continue
            log.info("adapt: %s", d.why)
            try:
                if d.grow:
                    await self.scaling.grow(d.grow)
                else:
                    await self.scaling.shrink(d.shrink)
                self._pressure_since = self._idle_since = None
            except Exception as e:  # a failed event rolled back; try again next round
                log.warning("adapt: %s failed: %s", d.why, e)
