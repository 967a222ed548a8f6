"""Heartbeats and failure detection. Every heartbeat the launcher is asked which rank processes still live, and
every live rank is pinged (its Pong carries its stats); a rank whose process is gone, that said RankFailed, or that
sent nothing for control.rank_timeout_s is FAILED and its job killed, so it cannot come back half-alive.

A member that fails is recovered from (`on_member_lost`: recovery.py re-forms the survivors and restarts its
requests there); a rank that was not a member takes its requests down with it, with an error.

A rank declared FAILED may still be alive: behind a cut link, its job cannot be killed (the scheduler cannot reach
the node either), and a requeued node job starts its ranks again under their old ids. Such a rank is fenced: every
message it sends is refused (its outputs would duplicate tokens its requests already got on the survivors, its acks
would count in epochs it has no part in), and it is told Shutdown, so it learns it was removed and exits, and its node
job ends and releases the node.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from eep_hpc import protocol as P
from eep_hpc.head.link import RankLink
from eep_hpc.head.membership import GONE, Membership, RankRecord, RankState
from eep_hpc.head.streams import Streams

log = logging.getLogger("eep_hpc.coordinator")


class Health:
    def __init__(self, membership: Membership, link: RankLink, streams: Streams, heartbeat_s: float,
                 rank_timeout_s: float, on_member_lost: Callable[[], bool]):
        """on_member_lost() starts a recovery and says whether one will run (not while the head stops)."""
        self.membership, self.link, self.streams = membership, link, streams
        self.heartbeat_s, self.rank_timeout_s = heartbeat_s, rank_timeout_s
        self.on_member_lost = on_member_lost
        self.fenced = 0  # messages refused from ranks already declared FAILED or EXITED

    def fence(self, rec: RankRecord, msg) -> bool:
        """-> True when `msg` comes from a rank that is no longer part of the run: refused, and the rank is told
        to shut down."""
        if rec.state not in GONE:
            return False
        self.fenced += 1
        log.warning("refused %s from rank %d, which is %s: telling it to shut down", type(msg).__name__,
                    rec.rank_id, rec.state.name)
        self.link.send(rec.rank_id, P.Shutdown())
        return True

    def fail(self, rec: RankRecord, why: str) -> None:
        rec.state = RankState.FAILED
        rec.job.kill()  # a rank declared dead must not come back half-alive
        if rec.rank_id in self.membership.members and self.on_member_lost():
            log.error("member rank %d lost: %s", rec.rank_id, why)  # its requests start again on the survivors
        else:
            self.streams.fail_on(rec, why)
        self.membership.changed()

    async def check_alive(self) -> None:
        """Ask the launcher about every live rank (alive() may ask the scheduler, so off the event loop): a dead
        process is FAILED."""
        live = self.membership.live()
        alive = await asyncio.to_thread(lambda: {rec.rank_id: rec.job.alive() for rec in live})
        for rec in live:
            if not alive[rec.rank_id] and rec.state not in GONE:
                self.fail(rec, "its process exited")

    async def run(self) -> None:
        """The heartbeat, until cancelled."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            await self.check_alive()
            now = time.monotonic()
            for rec in list(self.membership.ranks.values()):
                if rec.state in (RankState.LAUNCHED, *GONE):
                    continue
                if now - rec.last_seen > self.rank_timeout_s:
                    self.fail(rec, f"no message for {self.rank_timeout_s:.0f} s")
                else:
                    self.link.send(rec.rank_id, P.Ping(sent_at=time.time()))
