"""Heartbeats and failure detection. Every heartbeat the launcher is asked which rank processes still live, and
every live rank is pinged (its Pong carries its stats) by the link's beacon, a thread of its own (beacon.py): a
loop far behind its streams still pings, and its ranks stay. Here, on the loop, is decided whom; a rank whose process is gone, that said RankFailed, or that
sent nothing for control.rank_timeout_s is FAILED.

The bound: every rank sends a beacon each heartbeat from a thread of its own (rank/beacon.py), also while it loads
weights or waits in a collective, so a live rank with a working link is silent for about one heartbeat; silence of
rank_timeout_s (default 5 s, 5 heartbeats) means it stopped, or its link is cut. It is found within rank_timeout_s +
one heartbeat (the check's period). A round that comes late because the head itself was stalled judges nobody: the
ranks' messages of that time are still queued behind it.

A member that fails is recovered from (`on_member_lost`: recovery.py re-forms the survivors and restarts its
requests there); a rank that was not a member takes its requests down with it, with an error.

A rank whose process exited, or that reported its failure, has its job killed at once. A rank that only fell
silent may still be alive behind a cut link, where its job cannot be killed anyway (the scheduler cannot reach the
node either): it is fenced instead. Every message it sends is refused (its outputs would duplicate tokens its
requests already got on the survivors, its acks would count in epochs it has no part in), and it is told Shutdown,
so it learns it was removed and exits 0, and its node job ends cleanly and releases the node. Its job is killed
only if it is still there head_timeout_s + 2 heartbeats later (a rank that hears nothing from the head exits by
itself within head_timeout_s).

A node job that Slurm requeued (preempted with PreemptMode=REQUEUE) starts its ranks again under their old ids: a
new process says RankHello. It joins through a normal grow when `take_back` says the service still wants capacity
(the autoscaler's minimum); otherwise it is fenced like any other, and its job ends at once.
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


# A rank still talking this long after Slurm ended its job by a signal is past any kill grace (KillWait is 30 s by
# default): it is failed like one whose process exited.
SIGNALLED_GRACE_S = 60.0


class Health:
    def __init__(self, membership: Membership, link: RankLink, streams: Streams, heartbeat_s: float,
                 rank_timeout_s: float, head_timeout_s: float, on_member_lost: Callable[[], bool],
                 take_back: Callable[[RankRecord], bool] = lambda rec: False):
        """on_member_lost() starts a recovery and says whether one will run (not while the head stops);
        take_back(rec) brings a rank that started again into the serving group and says whether it will."""
        self.membership, self.link, self.streams = membership, link, streams
        self.heartbeat_s, self.rank_timeout_s, self.head_timeout_s = heartbeat_s, rank_timeout_s, head_timeout_s
        self.on_member_lost, self.take_back = on_member_lost, take_back
        self.fenced = 0  # messages refused from ranks already declared FAILED or EXITED
        self.fenced_ranks: set[int] = set()
        self.kill_later: dict[int, float] = {}  # silent ranks -> when to kill their job if it is still there
        self.signalled_at: dict[int, float] = {}  # ranks whose job a signal ended -> when the head first saw it

    def fence(self, rec: RankRecord, msg) -> bool:
        """-> True when `msg` comes from a rank that is no longer part of the run: refused, and the rank is told
        to shut down."""
        if rec.state not in GONE:
            return False
        if isinstance(msg, P.RankHello) and (msg.host, msg.pid) != (rec.host, rec.pid) and self.take_back(rec):
            log.info("rank %d started again on %s (its node job came back): it joins through a grow", rec.rank_id,
                     msg.host)
            rec.state = RankState.LAUNCHED  # its hello, handled next, makes it CONNECTED
            rec.job.started_again()  # else the scheduler's view of its first run's end would fail it at once
            self.kill_later.pop(rec.rank_id, None)
            self.fenced_ranks.discard(rec.rank_id)
            return False
        self.fenced += 1
        if rec.rank_id not in self.fenced_ranks:  # once per rank: what it queued behind a cut link arrives at once
            self.fenced_ranks.add(rec.rank_id)
            log.warning("refused %s from rank %d, which is %s: telling it to shut down", type(msg).__name__,
                        rec.rank_id, rec.state.name)
        self.link.send(rec.rank_id, P.Shutdown())
        return True

    def fail(self, rec: RankRecord, why: str, silent: bool = False) -> None:
        """`silent`: it only stopped sending (maybe behind a cut link): fenced when heard again, killed later."""
        rec.state = RankState.FAILED
        self.link.beacon.ping_only(r.rank_id for r in self.pinged())  # a rank cut off must hear nothing from now on
        if silent:
            self.kill_later[rec.rank_id] = time.monotonic() + self.head_timeout_s + 2 * self.heartbeat_s
        else:
            rec.job.kill()  # a rank that failed must not come back half-alive
        if rec.rank_id in self.membership.members and self.on_member_lost():
            log.error("member rank %d lost: %s", rec.rank_id, why)  # its requests start again on the survivors
        else:
            self.streams.fail_on(rec, why)
        self.membership.changed()

    async def check_alive(self) -> None:
        """Ask the launcher about every live rank (alive() may ask the scheduler, so off the event loop): a dead
        process is FAILED."""
        live = self.membership.live()
        ended = await asyncio.to_thread(lambda: {rec.rank_id: rec.job.signalled() for rec in live
                                                 if not rec.job.alive()})
        now = time.monotonic()
        for rid in [r for r in self.signalled_at if r not in ended]:
            del self.signalled_at[rid]  # came back (requeued) or gone
        for rec in live:
            if rec.rank_id not in ended or rec.state in GONE:
                continue
            if ended[rec.rank_id]:
                since = self.signalled_at.setdefault(rec.rank_id, now)
                if now - rec.last_seen < 2 * self.heartbeat_s and now - since < SIGNALLED_GRACE_S:
                    # Slurm says a signal ended its job (preemption, scancel), yet it spoke just now: its node
                    # agent's notice, and with it a drain, is on its way. Silence fails it (rank_timeout_s) if none
                    # comes; so does talking on past any kill grace.
                    continue
            self.fail(rec, "its process exited")

    async def kill_silent(self) -> None:
        """The jobs of silent ranks not heard of since (not fenced, not exited): killed, to release their nodes."""
        now = time.monotonic()
        due = [self.membership.ranks[r] for r, at in self.kill_later.items() if at <= now]
        for rec in due:
            del self.kill_later[rec.rank_id]
        stuck = await asyncio.to_thread(lambda: [rec for rec in due if rec.job.alive()])
        for rec in stuck:
            log.warning("rank %d stayed silent for %.0f s after it was declared lost: killing its job", rec.rank_id,
                        self.head_timeout_s)
            await asyncio.to_thread(rec.job.kill)

    async def run(self) -> None:
        """The heartbeat, until cancelled."""
        while True:
            slept = time.monotonic()
            await asyncio.sleep(self.heartbeat_s)
            stalled = time.monotonic() - slept > 2 * self.heartbeat_s  # the head's own loop was held up
            await self.check_alive()
            await self.kill_silent()
            now = time.monotonic()
            for rec in self.pinged():
                if now - rec.last_seen > self.rank_timeout_s and not stalled:
                    self.fail(rec, f"no message for {self.rank_timeout_s:g} s", silent=True)
            self.link.beacon.ping_only(rec.rank_id for rec in self.pinged())

    def pinged(self) -> list[RankRecord]:
        """The ranks that hear from the head: connected and not gone."""
        return [rec for rec in self.membership.ranks.values() if rec.state not in (RankState.LAUNCHED, *GONE)]
