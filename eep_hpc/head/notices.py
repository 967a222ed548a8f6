"""Scheduler notices: a node agent says its node job leaves in T seconds (walltime warning, preemption, scancel).
Its ranks are drained (a shrink: experts copied to survivors first, requests moved) as soon as no other event
runs, within the notice; ranks that never joined are just told to exit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine

from eep_hpc import protocol as P
from eep_hpc.head.epoch_exchange import EpochExchange
from eep_hpc.head.events import ScaleBusy
from eep_hpc.head.link import RankLink
from eep_hpc.head.membership import GONE, Membership, RankState
from eep_hpc.head.scaling import Scaling

log = logging.getLogger("eep_hpc.coordinator")


class NodeNotices:
    def __init__(self, membership: Membership, link: RankLink, exchange: EpochExchange, scaling: Scaling,
                 spawn: Callable[[Coroutine], asyncio.Task]):
        self.membership, self.link, self.exchange, self.scaling, self.spawn = membership, link, exchange, scaling, spawn
        self.received: list[P.NodeLeaving] = []  # for status
        self.closed = False  # the whole service is going down (a signal to the process group): nothing to hand off

    def take(self, notice: P.NodeLeaving) -> None:
        self.received.append(notice)
        self.spawn(self._release(notice))

    def close(self) -> None:
        self.closed = True

    async def _release(self, notice: P.NodeLeaving) -> None:
        if self.closed:
            return
        m = self.membership
        log.warning("node job %s leaves in %.0f s (%s): draining ranks %s", notice.job_id, notice.seconds,
                    notice.reason, notice.rank_ids)
        deadline = time.monotonic() + notice.seconds
        while time.monotonic() < deadline:
            members = [r for r in notice.rank_ids if r in m.members]
            if not members:  # never joined (still starting) or already gone: just let them exit
                for rid in notice.rank_ids:
                    if rid in m.ranks and m.ranks[rid].state not in GONE:
                        self.link.send(rid, P.Shutdown())
                        m.ranks[rid].state = RankState.EXITED
                return
            if self.exchange.event is None:
                if len(members) == len(m.members):
                    log.error("node job %s holds every serving rank; nothing can take over its work", notice.job_id)
                    return
                try:
                    await self.scaling.shrink(members)
                    return
                except ScaleBusy:
                    pass
                except Exception as e:
                    log.error("draining node job %s failed: %s; retrying while the notice lasts", notice.job_id, e)
            await asyncio.sleep(0.2)
        log.error("node job %s: notice ran out before its ranks could be drained", notice.job_id)
