"""The head's side of the epoch protocol: it moves the serving group from one epoch to the next with the ranks,
one ScaleEvent at a time (events.py), and rolls back to the serving epoch on any failure.

    joining ranks   <- PrepareEpoch           -> RankStaged     (skeleton, dense weights, KV cache)
    participants    <- PrepareEpoch (again)   -> EpochPrepared  (experts copied into staging, groups built)
                                                 or PrepareFailed
    participants    <- CommitEpoch(wave)      -> EpochJoined (new members) / EpochLeft (departing ranks)
    departing ranks <- Shutdown

Departing ranks get no new requests once the event starts; their requests move to survivors while experts are
copied. A recovery (members lost abruptly) runs the same exchange without the lost ranks; survivors dropped every
request when their group broke, so all open requests start again after the commit. Which members and placement an
event goes to is decided by scaling.py; this module only carries it out.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from eep_hpc import protocol as P
from eep_hpc.head.events import ScaleBusy, ScaleEvent, ScaleFailed, ScalePhase, describe_event
from eep_hpc.head.jobs import RankJobs
from eep_hpc.head.link import RankLink
from eep_hpc.head.membership import GONE, Membership, RankState
from eep_hpc.head.streams import Streams
from eep_hpc.parallel.eplb import CHECKPOINT, Placement, plan_moves

log = logging.getLogger("eep_hpc.coordinator")

Ack = P.RankStaged | P.EpochPrepared | P.PrepareProgress | P.EpochLeft | P.EpochJoined | P.PrepareFailed


class EpochExchange:
    def __init__(self, membership: Membership, link: RankLink, streams: Streams, jobs: RankJobs,
                 event_timeout_s: float):
        self.membership, self.link, self.streams, self.jobs = membership, link, streams, jobs
        self.event_timeout_s = event_timeout_s
        self.event: ScaleEvent | None = None  # the event in progress
        self.history: list[ScaleEvent] = []
        self.acks: dict[tuple[str, int], set[int]] = {}  # (message kind, epoch) -> rank ids that sent it

    def form_first(self, rank_ids: list[int], placement: Placement) -> None:
        """The first epoch: no event, nothing to move; each member builds its groups and says EpochJoined."""
        m = self.membership
        m.commit(m.next_epoch_number(), rank_ids, placement)
        msg = self.link.epoch(m.epoch, m.members, placement)
        for rid in m.members:
            self.link.send(rid, msg)

    def check_idle(self) -> None:
        if self.event is not None:
            raise ScaleBusy(f"a {self.event.kind} to epoch {self.event.epoch} is in progress "
                            f"({self.event.phase.name.lower()}); try again when it ends")

    def open(self, kind: str, new_members: list[int]) -> ScaleEvent:
        """The event from the serving members to `new_members`; ScaleBusy while another runs."""
        self.check_idle()
        m = self.membership
        self.event = ScaleEvent(kind, m.next_epoch_number(), list(m.members), list(new_members))
        return self.event

    def record(self, event: ScaleEvent) -> None:
        """An event that failed before it could open (e.g. its ranks never started), for history and status."""
        self.history.append(event)

    def take(self, msg: Ack) -> None:
        """A rank's answer in the exchange."""
        self.acks.setdefault((type(msg).__name__, msg.epoch), set()).add(msg.rank_id)
        event = self.event
        if event is None or event.epoch != msg.epoch:
            return
        if isinstance(msg, P.PrepareProgress):
            event.progressed = time.monotonic()
            event.reads[msg.rank_id] = (msg.bytes_received, msg.bytes_total)
        elif isinstance(msg, P.EpochPrepared):
            event.bytes_moved += msg.bytes_received
            if msg.rank_id in event.old_members:  # a serving member: did it stop serving to prepare, how long
                event.prepare_pause_s = max(event.prepare_pause_s, msg.pause_s)
                fewest = event.served_while_preparing
                event.served_while_preparing = msg.served_steps if fewest is None else min(fewest, msg.served_steps)
        elif isinstance(msg, P.RankStaged):
            self.membership.ranks[msg.rank_id].nixl = msg.nixl
            event.bytes_moved += msg.dense_bytes
            event.dense_bytes += msg.dense_bytes
            event.dense_source = ",".join(filter(None, [event.dense_source, msg.dense_source]))

    async def run(self, event: ScaleEvent, placement: Placement) -> ScaleEvent:
        """Prepare, commit, and make `placement` over event.new_members the serving epoch; on any failure roll
        back and raise."""
        m, send = self.membership, self.link.send
        kind, old, new_members = event.kind, event.old_members, event.new_members
        timeout_s = self.event_timeout_s
        try:
            prepare = self._prepare(event, placement)
            log.info("%s: epoch %d -> %d, ranks %s -> %s, %d expert copies", kind, event.epoch - 1, event.epoch, old,
                     new_members, event.experts_moved)
            for rid in event.departing:  # no new requests; in-flight ones move to survivors while experts are copied
                m.ranks[rid].state = RankState.DRAINING
                event.requests_migrated += self.streams.migrate_from(rid, new_members)
            for rid in event.joining:
                send(rid, prepare)
            # from the latest progress of a joiner's dense read, as the expert reads' below
            await self._acked("RankStaged", event.epoch, event.joining, timeout_s * 4, since=lambda: event.progressed)
            # copies over NIXL when every participant has it (decided now: joiners said so when staged); joiners
            # get this second PrepareEpoch too, and start copying on it
            if all(m.ranks[r].nixl for r in event.participants):
                prepare.transfer = "nixl"
            if "broadcast" in event.dense_source.split(","):
                prepare.transfer, prepare.broadcast_dense = "collective", True
            for rid in event.participants:
                send(rid, prepare)
            # counted from the latest progress of any participant's reads: a large move over a slow link is no
            # hung one (each rank fails its own reads when no piece arrives for a while)
            await self._acked("EpochPrepared", event.epoch, event.participants, timeout_s * 2,
                              since=lambda: event.progressed)
            event.prepare_s = time.monotonic() - event.started
            event.phase = ScalePhase.COMMITTING
            t_commit = time.monotonic()
            self.streams.watch_gaps(event)
            commit = P.CommitEpoch(epoch=event.epoch, wave=self.streams.commit_wave())
            for rid in event.participants:
                send(rid, commit)
            await self._acked("EpochJoined", event.epoch, new_members, timeout_s)
            await self._acked("EpochLeft", event.epoch, event.departing, timeout_s)
        except BaseException as e:
            self.roll_back(event, e)
            raise
        event.commit_s = time.monotonic() - t_commit
        m.commit(event.epoch, new_members, placement)
        for rid in new_members:
            m.ranks[rid].state = RankState.READY
        for rid in event.departing:
            event.requests_migrated += self.streams.migrate_from(rid, new_members)  # any that still slipped in
            send(rid, P.Shutdown())
            m.ranks[rid].state = RankState.EXITED
        if kind == "recover":  # survivors dropped every request when their group broke: all start again
            event.requests_migrated = self.streams.restart_all(new_members)
        event.phase = ScalePhase.DONE
        self._finish(event)
        log.info("%s", describe_event(event.summary()))
        return event

    def _prepare(self, event: ScaleEvent, placement: Placement) -> P.PrepareEpoch:
        """The PrepareEpoch of this event: the target epoch and every expert copy from the serving placement."""
        m, old = self.membership, event.old_members
        moves = plan_moves(m.placement, old, placement, event.new_members, lost=set(event.lost))
        event.experts_moved = sum(1 for mv in moves if mv.src_rank != mv.dst_rank)
        old_p2l = m.placement.physical_to_logical.tolist()
        old_start = {rid: m.placement.slot_offsets[i] for i, rid in enumerate(old)}

        def src_local_slot(mv) -> int:
            if mv.src_rank == CHECKPOINT:
                return -1
            start = old_start[mv.src_rank]
            return old_p2l[mv.layer].index(mv.logical, start) - start

        return P.PrepareEpoch(target=self.link.epoch(event.epoch, event.new_members, placement),
                              participants=event.participants, num_kv_blocks=min(m.ranks[r].num_kv_blocks for r in old),
                              source_epoch=m.epoch, recovery=event.kind == "recover",
                              moves=[[mv.layer, mv.logical, mv.src_rank, mv.dst_rank, mv.dst_slot, src_local_slot(mv)]
                                     for mv in moves])

    def roll_back(self, event: ScaleEvent, why: BaseException) -> None:
        m = self.membership
        event.error = f"{type(why).__name__}: {why}"
        log.error("%s to epoch %d failed, rolling back to epoch %d: %s", event.kind, event.epoch, m.epoch, event.error)
        for rid in event.participants:
            self.link.send(rid, P.AbortEpoch(epoch=event.epoch))
        for rid in event.departing:
            if m.ranks[rid].state == RankState.DRAINING:
                m.ranks[rid].state = RankState.READY
        self.jobs.discard([r for r in event.joining if m.ranks[r].state != RankState.EXITED])
        if self.streams.open:
            self.streams.start_wave()
        event.phase = ScalePhase.ROLLED_BACK
        self._finish(event)

    def _finish(self, event: ScaleEvent) -> None:
        self.streams.stop_watching()
        self.history.append(event)
        self.event = None
        for key in [k for k in self.acks if k[1] <= event.epoch]:
            del self.acks[key]

    async def _acked(self, kind: str, epoch: int, ranks: list[int], timeout_s: float,
                     since: Callable[[], float] | None = None) -> None:
        """Wait until every rank in `ranks` sent `kind` for `epoch`; raise ScaleFailed on a failure, or after
        `timeout_s` (from the later of now and `since()`, when given)."""
        def done():
            failed = self.acks.get(("PrepareFailed", epoch), set())
            dead = [r for r in ranks if self.membership.ranks[r].state in GONE]
            if failed or dead:
                raise ScaleFailed(f"rank(s) {sorted(failed | set(dead))} failed during {kind} of epoch {epoch}")
            return set(ranks) <= self.acks.get((kind, epoch), set())

        await self.membership.wait_for(done, timeout_s, f"{kind} from ranks {ranks}", raise_on_failed=False,
                                       since=since)
