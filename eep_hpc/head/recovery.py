"""Recovery from lost members: until the survivors serve in a new epoch, let a scaling event in progress fail on
the lost rank and roll back, check which members are alive, and re-form (scaling.recover). Open requests wait
meanwhile (Membership.recovering); they fail only when no member is left or every attempt failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine

from eep_hpc.head.epoch_exchange import EpochExchange
from eep_hpc.head.events import ScaleBusy
from eep_hpc.head.membership import Membership, RankState
from eep_hpc.head.scaling import Scaling
from eep_hpc.head.streams import Streams

log = logging.getLogger("eep_hpc.coordinator")

RECOVERY_ATTEMPTS = 5  # re-forming after a loss gives up (and fails the open requests) after this many tries


class Recovery:
    def __init__(self, membership: Membership, exchange: EpochExchange, scaling: Scaling, streams: Streams,
                 check_alive: Callable[[], Awaitable[None]], heartbeat_s: float, rank_timeout_s: float,
                 spawn: Callable[[Coroutine], asyncio.Task]):
        self.membership, self.exchange, self.scaling, self.streams = membership, exchange, scaling, streams
        self.check_alive, self.spawn = check_alive, spawn
        self.heartbeat_s, self.rank_timeout_s = heartbeat_s, rank_timeout_s
        self.closed = False  # the head is going down: nothing is re-formed

    def start(self) -> bool:
        """Members were lost: re-form without them (once; a recovery under way covers later losses too) -> whether
        a recovery runs."""
        if self.closed:
            return False
        if not self.membership.recovering:
            self.membership.recovering = True
            self.spawn(self._run())
        return True

    def close(self) -> None:
        self.closed = True

    async def _run(self) -> None:
        m = self.membership
        attempts = 0
        try:
            while not self.closed:
                while self.exchange.event is not None:
                    await asyncio.sleep(0.05)
                # a peer's broken connection is often heard of before its exit: give the launcher a moment to
                # see which member died, rather than re-forming with it; a member behind a cut link is declared
                # lost by the health check once it was silent rank_timeout_s (the survivors' collectives give up
                # on it at about the same time): wait for that too, rather than re-forming with it
                silent_since = min((m.ranks[r].last_seen for r in m.members), default=time.monotonic())
                deadline = max(time.monotonic() + 2 * self.heartbeat_s,
                               silent_since + self.rank_timeout_s + 2 * self.heartbeat_s)
                await self.check_alive()
                while not m.lost() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    await self.check_alive()
                try:
                    await self.scaling.recover()
                    return
                except ScaleBusy:
                    continue
                except Exception as e:  # ScaleFailed, or anything else: it must not leave requests waiting
                    attempts += 1
                    alive = any(m.ranks[r].state == RankState.READY for r in m.members)
                    if not alive or attempts >= RECOVERY_ATTEMPTS:
                        log.error("cannot recover (attempt %d): %s", attempts, e)
                        self.streams.end_all("error", f"the serving group could not recover: {e}")
                        return
                    log.error("recovery attempt %d failed, retrying: %s", attempts, e)
                await asyncio.sleep(0.5 * attempts)
        finally:
            m.recovering = False
            m.changed()
