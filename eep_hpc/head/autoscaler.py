"""Adaptive scaling (like dask-jobqueue's adapt, with its job lifetime): grow while load stays high, shrink ranks
that stay idle, replace ranks before their lifetime (walltime) ends, never below `min_ranks` or above `max_ranks`.

`decide` is a pure function of what the coordinator observed; `Autoscaler` keeps the little history it needs
(how long pressure or idleness has lasted) and asks the coordinator to grow or shrink, one event at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from eep_hpc.config import AdaptConfig

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
    def __init__(self, coordinator, cfg: AdaptConfig):
        self.c, self.cfg = coordinator, cfg
        self._pressure_since: float | None = None
        self._idle_since: float | None = None
        self.last: Decision = Decision()

    def observe(self, now: float) -> list[RankLoad]:
        c = self.c
        ranks = []
        for rid in c.members:
            rec = c.ranks[rid]
            s = rec.stats
            ranks.append(RankLoad(rid, now - rec.started, s.num_running, s.num_waiting,
                                  s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0))
        return ranks

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.interval_s)
            if not self.cfg.enabled or self.c.event is not None or not self.c.ready():
                continue
            now = time.monotonic()
            ranks = self.observe(now)
            self._pressure_since = (self._pressure_since or now) if under_pressure(self.cfg, ranks) else None
            busy_streams = len(self.c.streams) > 0
            self._idle_since = (self._idle_since or now) if idle(ranks) and not busy_streams else None
            d = decide(self.cfg, ranks, now - (self._pressure_since or now), now - (self._idle_since or now))
            self.last = d
            if not (d.grow or d.shrink):
                continue
            log.info("adapt: %s", d.why)
            try:
                if d.grow:
                    await self.c.grow(d.grow)
                else:
                    await self.c.shrink(d.shrink)
                self._pressure_since = self._idle_since = None
            except Exception as e:  # a failed event rolled back; try again next round
                log.warning("adapt: %s failed: %s", d.why, e)
