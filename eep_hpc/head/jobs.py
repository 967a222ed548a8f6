"""Rank processes as launcher jobs: submit them (n of one pool, or several pools as one heterogeneous job), cancel
those still queued, discard those that will not join, reap those that left, and shut them all down.

Rank ids are handed out here, once each, in submission order. Each new rank gets a RankLaunch with the config for
ranks (no API key or admin token: main.py) and its record in the membership.
"""

from __future__ import annotations

import asyncio
import logging
import time

from eep_hpc import protocol as P
from eep_hpc.cluster.launcher import Launcher
from eep_hpc.config import Config
from eep_hpc.head.link import RankLink
from eep_hpc.head.membership import GONE, Membership, RankRecord, RankState

log = logging.getLogger("eep_hpc.coordinator")


class RankJobs:
    def __init__(self, launcher: Launcher, membership: Membership, link: RankLink, rank_config: Config,
                 model_dir: str, eos_token_ids: list[int]):
        self.launcher, self.membership, self.link = launcher, membership, link
        self.rank_config, self.model_dir, self.eos_token_ids = rank_config, model_dir, eos_token_ids
        self.next_rank_id = 0

    def launch(self, n: int, pool: str = "", pools: dict[str, int] | None = None) -> list[int]:
        """Submit ranks: n of one pool, or {pool: count} as one heterogeneous submission -> their rank ids."""
        if pools:
            groups = {name: self._launches(count) for name, count in pools.items()}
            launches = [launch for group in groups.values() for launch in group]
            pool_of = {launch.rank_id: name for name, group in groups.items() for launch in group}
            jobs = self.launcher.launch_pools(groups)
        else:
            launches = self._launches(n)
            pool = pool or self.rank_config.parallel.pool
            pool_of = {launch.rank_id: pool for launch in launches}
            jobs = self.launcher.launch(launches, pool=pool) if pool else self.launcher.launch(launches)
        for launch, job in zip(launches, jobs):
            shape = self.rank_config.pools.get(pool_of[launch.rank_id])
            self.membership.ranks[launch.rank_id] = RankRecord(launch.rank_id, job,
                                                               capacity=shape.expert_capacity if shape else 1.0)
        return [launch.rank_id for launch in launches]

    def _launches(self, count: int) -> list[P.RankLaunch]:
        out = []
        for _ in range(count):
            rid = self.next_rank_id
            self.next_rank_id += 1
            out.append(P.RankLaunch(rank_id=rid, head_address=self.link.address,
                                    head_beacon_address=self.link.beacon.address, model_dir=self.model_dir,
                                    eos_token_ids=self.eos_token_ids, device=self.launcher.device_for(rid),
                                    config=self.rank_config, api_addresses=list(self.link.api_addresses)))
        return out

    def cancel_pending(self, rank_ids: list[int]) -> list[int]:
        """Cancel ranks that were submitted but have not joined (e.g. queued node jobs) -> those cancelled."""
        m = self.membership
        cancelled = []
        for rid in rank_ids:
            rec = m.ranks.get(rid)
            if rec is not None and rid not in m.members and rec.state in (RankState.LAUNCHED, RankState.CONNECTED):
                rec.job.cancel()
                rec.state = RankState.EXITED
                cancelled.append(rid)
        m.changed()
        return cancelled

    def discard(self, rank_ids: list[int]) -> None:
        """Ranks that will not join (their event failed): told to exit, and killed."""
        for rid in rank_ids:
            rec = self.membership.ranks[rid]
            self.link.send(rid, P.Shutdown())
            rec.job.kill()
            rec.state = RankState.EXITED

    async def reap_departed(self, grace_s: float = 10.0) -> None:
        """Ranks told to exit may still be tearing down (and hold their GPU): wait for them, then kill, so a new
        rank is placed by what is really in use."""
        now = time.monotonic()
        recent = [r for r in self.membership.ranks.values() if r.state == RankState.EXITED and now - r.last_seen < 60]
        lingering = await asyncio.to_thread(lambda: [r for r in recent if r.job.alive()])
        deadline = now + grace_s
        while lingering and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            lingering = await asyncio.to_thread(lambda: [r for r in lingering if r.job.alive()])
        for rec in lingering:
            log.warning("rank %d did not exit %.0f s after it left; killing it", rec.rank_id, grace_s)
            rec.job.kill()

    async def shut_down(self, grace_s: float) -> None:
        """Every rank told to exit; those still running after grace_s are killed."""
        ranks = self.membership.ranks.values()
        for rec in ranks:
            if rec.state not in GONE:
                self.link.send(rec.rank_id, P.Shutdown())
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(r.job.alive() for r in ranks):
            await asyncio.sleep(0.1)
        for rec in ranks:
            if rec.job.alive():
                log.warning("rank %d did not exit in %.0f s, killing it", rec.rank_id, grace_s)
                rec.job.kill()
            rec.state = RankState.EXITED
