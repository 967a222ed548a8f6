"""Scaling operations: grow, shrink, rebalance, recover. Each decides the members of the next epoch and their
expert placement (EPLB by the load counted so far, kept close to the serving placement), then the epoch exchange
carries it out as one ScaleEvent, with rollback to the serving epoch on any failure.

A grow first submits its ranks and waits, holding no event, until they have started: seconds (local) or hours (a
queued Slurm job) later; meanwhile other events (a node's release) are not blocked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from eep_hpc.head.epoch_exchange import EpochExchange
from eep_hpc.head.events import ScaleBusy, ScaleEvent, ScaleFailed, ScalePhase, describe_event
from eep_hpc.head.expert_load import ExpertLoad
from eep_hpc.head.jobs import RankJobs
from eep_hpc.head.membership import Membership, RankState, is_pending, slots_per_rank
from eep_hpc.parallel.eplb import Placement, align_previous, rebalance

log = logging.getLogger("eep_hpc.coordinator")


class Scaling:
    def __init__(self, membership: Membership, exchange: EpochExchange, jobs: RankJobs, load: ExpertLoad,
                 num_experts: int, redundant_experts: int, event_timeout_s: float):
        self.membership, self.exchange, self.jobs, self.load = membership, exchange, jobs, load
        self.num_experts, self.redundant_experts = num_experts, redundant_experts
        self.event_timeout_s = event_timeout_s

    def busy(self) -> bool:
        """An event is in progress (a second would be refused)."""
        return self.exchange.event is not None

    def slots_for(self, rank_ids: list[int]) -> list[int]:
        ranks = self.membership.ranks
        return slots_per_rank(self.num_experts, self.redundant_experts, [ranks[r].capacity for r in rank_ids])

    async def _placement_for(self, members: list[int]) -> Placement:
        """EPLB over these members, starting from the serving placement (their slots kept where possible)."""
        m = self.membership
        slots = self.slots_for(members)
        previous = align_previous(m.placement, m.members, members, slots)
        return await asyncio.to_thread(rebalance, self.load.or_uniform(), slots, previous)

    async def _change_to(self, kind: str, members: list[int]) -> dict:
        event = self.exchange.open(kind, members)
        try:
            placement = await self._placement_for(members)
        except BaseException as e:
            self.exchange.roll_back(event, e)
            raise
        return (await self.exchange.run(event, placement)).summary()

    async def rebalance(self) -> dict:
        """Re-place experts by the load counted since the last rebalance (same members, a new epoch). When the
        new placement is the serving one, nothing happens: no event, no new epoch, no pause; the answer says
        "moved": 0 and "phase": "UNCHANGED"."""
        m = self.membership
        self.exchange.check_idle()
        members = list(m.members)
        new = await asyncio.to_thread(rebalance, self.load.or_uniform(), self.slots_for(members), m.placement)
        if new == m.placement and members == m.members:
            self.load.reset()
            return {**ScaleEvent("rebalance", m.epoch, members, members).summary(), "phase": "UNCHANGED", "moved": 0}
        event = await self.exchange.run(self.exchange.open("rebalance", members), new)
        self.load.reset()
        return event.summary()

    async def grow(self, n: int = 0, pool: str = "", pools: dict[str, int] | None = None) -> dict:
        """Submit n more ranks (or {pool: count} as one heterogeneous job) and bring them into the serving group
        in one scaling event once they have started."""
        return await self.bring_in(await self.submit(n, pool, pools))

    async def submit(self, n: int = 0, pool: str = "", pools: dict[str, int] | None = None) -> list[int]:
        """Submit the ranks of a grow -> their rank ids (bring_in then makes them members)."""
        if (n < 1) == (not pools) or (pools and any(c < 1 for c in pools.values())):
            raise ValueError("grow needs n >= 1, or pools with counts >= 1")
        await self.jobs.reap_departed()
        return self.jobs.launch(n, pool, pools)

    async def bring_in(self, joining: list[int]) -> dict:
        """Wait until these submitted ranks have started, and for the event in progress to end; then one event
        makes them members."""
        m = self.membership
        try:
            await m.wait_for(lambda: not any(is_pending(m.ranks[r].job) for r in joining), float("inf"),
                             "queued node jobs to start", watch=joining)
            await m.wait_for(lambda: all(m.ranks[r].state == RankState.CONNECTED for r in joining)
                             or any(m.ranks[r].state == RankState.EXITED for r in joining),
                             self.event_timeout_s * 4, f"{len(joining)} new rank(s) to start", watch=joining)
            cancelled = [r for r in joining if m.ranks[r].state == RankState.EXITED]
            if cancelled:
                raise ScaleFailed(f"rank(s) {cancelled} were cancelled before they joined")
            while self.busy():
                await asyncio.sleep(0.1)
        except BaseException as e:
            self.jobs.discard([r for r in joining if m.ranks[r].state != RankState.EXITED])
            failed = ScaleEvent("grow", -1, list(m.members), m.members + joining, phase=ScalePhase.ROLLED_BACK,
                                error=f"{type(e).__name__}: {e}")
            self.exchange.record(failed)
            log.error("grow by %s failed before it could start: %s", joining, failed.error)
            raise
        return await self._change_to("grow", m.members + joining)

    async def shrink(self, rank_ids: list[int]) -> dict:
        """Drain and remove these ranks: experts first, their requests to survivors, commit, then they exit.
        Ranks still queued or starting are simply cancelled."""
        m = self.membership
        if not rank_ids:
            raise ValueError("shrink needs at least one rank id")
        cancelled = self.jobs.cancel_pending(rank_ids)
        rank_ids = [r for r in rank_ids if r not in cancelled]
        if cancelled and not rank_ids:
            return {"kind": "cancel", "cancelled": cancelled}
        unknown = [r for r in rank_ids if r not in m.members]
        if unknown:
            raise ValueError(f"rank(s) {unknown} are not members; members are {m.members}")
        survivors = [r for r in m.members if r not in rank_ids]
        if not survivors:
            raise ValueError("cannot shrink below one rank")
        self.exchange.check_idle()
        new = await self._placement_for(survivors)
        return (await self.exchange.run(self.exchange.open("shrink", survivors), new)).summary()

    async def recover(self) -> dict:
        """Members died abruptly (no notice, no drain): the survivors re-form a group of a new epoch without them,
        experts they alone held come from replicas on survivors or else the checkpoint, and every open request
        starts again on the survivors from its tokens so far."""
        m = self.membership
        lost = m.lost()
        survivors = [r for r in m.members if r not in lost]
        if not survivors:
            raise ScaleFailed(f"every member ({m.members}) was lost")
        event = self.exchange.open("recover", survivors)
        event.lost = lost
        if lost:
            event.detect_s = max(0.0, event.started - min(m.ranks[r].last_seen for r in lost))
        try:
            placement = await self._placement_for(survivors)
        except BaseException as e:
            self.exchange.roll_back(event, e)
            raise
        return (await self.exchange.run(event, placement)).summary()

    async def rebalance_every(self, period_s: float, ready: Callable[[], bool]) -> None:
        """Re-place experts every period_s of serving when load was counted and nothing else runs."""
        while True:
            await asyncio.sleep(period_s)
            if self.busy() or self.load.counted is None or not ready():
                continue
            try:
                log.info("periodic expert rebalance: %s", describe_event(await self.rebalance()))
            except (ScaleBusy, ScaleFailed) as e:
                log.warning("periodic expert rebalance skipped: %s", e)
