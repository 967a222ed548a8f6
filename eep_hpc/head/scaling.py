"""Scaling events driven by the coordinator: grow, shrink, rebalance, scheduler notices, each one ScaleEvent.

Kept apart from the coordinator's message loop: these methods read and change its membership (members, epoch,
placement, ranks) and run the PrepareEpoch -> EpochPrepared -> CommitEpoch -> EpochJoined/EpochLeft exchange,
with rollback to the serving epoch on any failure (see scaling.py for the state machine).
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from eep_hpc import protocol as P
from eep_hpc.head.membership import RankState, is_pending, slots_per_rank
from eep_hpc.head.events import ScaleBusy, ScaleEvent, ScaleFailed, ScalePhase
from eep_hpc.parallel.eplb import CHECKPOINT, Placement, align_previous, plan_moves, rebalance

log = logging.getLogger("eep_hpc.coordinator")


class ScalingMixin:
    """Grow/shrink/rebalance for `Coordinator` (which supplies ranks, members, placement, send, _wait_for...)."""

    def _slots_for(self, rank_ids: list[int]) -> list[int]:
        return slots_per_rank(self.num_experts, self.cfg.parallel.redundant_experts,
                              [self.ranks[r].capacity for r in rank_ids])

    async def rebalance_experts(self) -> dict:
        """Re-place experts by the load counted since the last rebalance (same members, a new epoch)."""
        members = list(self.members)
        load = self.expert_load if self.expert_load is not None else torch.ones(self.num_moe_layers, self.num_experts)
        new = await asyncio.to_thread(rebalance, load, self._slots_for(members), self.placement)
        event = await self._run_event(self._open_event("rebalance", members), new)
        self.expert_load = None
        return event.summary()

    async def grow(self, n: int = 0, pool: str = "", pools: dict[str, int] | None = None) -> dict:
        """Submit n more ranks (or {pool: count} as one heterogeneous job) and bring them into the serving group
        in one scaling event once they have started: seconds (local) or hours (a queued Slurm job) later. While
        they are queued no event is held, so other events (a node's release) are not blocked; a grow whose ranks
        are up waits for the event in progress, then runs."""
        if (n < 1) == (not pools) or (pools and any(c < 1 for c in pools.values())):
            raise ValueError("grow needs n >= 1, or pools with counts >= 1")
        await self._reap_departed()
        joining = self.launch(n, pool, pools)
        ctl = self.cfg.control
        try:
            await self._wait_for(lambda: not any(is_pending(self.ranks[r].job) for r in joining), float("inf"),
                                 "queued node jobs to start", watch=joining)
            await self._wait_for(lambda: all(self.ranks[r].state == RankState.CONNECTED for r in joining)
                                 or any(self.ranks[r].state == RankState.EXITED for r in joining),
                                 ctl.rank_timeout_s * 4, f"{len(joining)} new rank(s) to start", watch=joining)
            cancelled = [r for r in joining if self.ranks[r].state == RankState.EXITED]
            if cancelled:
                raise ScaleFailed(f"rank(s) {cancelled} were cancelled before they joined")
            while self.event is not None:
                await asyncio.sleep(0.1)
        except BaseException as e:
            self._discard([r for r in joining if self.ranks[r].state != RankState.EXITED])
            failed = ScaleEvent("grow", -1, list(self.members), self.members + joining, phase=ScalePhase.ROLLED_BACK,
                                error=f"{type(e).__name__}: {e}")
            self.history.append(failed)
            log.error("grow by %s failed before it could start: %s", joining, failed.error)
            raise
        event = self._open_event("grow", self.members + joining)
        try:
            slots = self._slots_for(event.new_members)
            previous = align_previous(self.placement, self.members, event.new_members, slots)
            new = await asyncio.to_thread(rebalance, self._load_or_uniform(), slots, previous)
        except BaseException as e:
            self._roll_back(event, e)
            raise
        return (await self._run_event(event, new)).summary()

    async def _reap_departed(self, grace_s: float = 10.0) -> None:
        """Ranks told to exit may still be tearing down (and hold their GPU): wait for them, then kill, so a new
        rank is placed by what is really in use."""
        now = time.monotonic()
        recent = [r for r in self.ranks.values() if r.state == RankState.EXITED and now - r.last_seen < 60]
        lingering = await asyncio.to_thread(lambda: [r for r in recent if r.job.alive()])
        deadline = now + grace_s
        while lingering and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            lingering = await asyncio.to_thread(lambda: [r for r in lingering if r.job.alive()])
        for rec in lingering:
            log.warning("rank %d did not exit %.0f s after it left; killing it", rec.rank_id, grace_s)
            rec.job.kill()

    def cancel_pending(self, rank_ids: list[int]) -> list[int]:
        """Cancel ranks that were submitted but have not joined (e.g. queued node jobs)."""
        cancelled = []
        for rid in rank_ids:
            rec = self.ranks.get(rid)
            if rec is not None and rid not in self.members and rec.state in (RankState.LAUNCHED, RankState.CONNECTED):
                rec.job.cancel()
                rec.state = RankState.EXITED
                cancelled.append(rid)
        self._changed.set()
        return cancelled

    async def shrink(self, rank_ids: list[int]) -> dict:
        """Drain and remove these ranks: experts first, their requests to survivors, commit, then they exit.
        Ranks still queued or starting are simply cancelled."""
        cancelled = self.cancel_pending(rank_ids)
        rank_ids = [r for r in rank_ids if r not in cancelled]
        if cancelled and not rank_ids:
            return {"kind": "cancel", "cancelled": cancelled}
        unknown = [r for r in rank_ids if r not in self.members]
        if unknown:
            raise ValueError(f"rank(s) {unknown} are not members; members are {self.members}")
        survivors = [r for r in self.members if r not in rank_ids]
        if not survivors:
            raise ValueError("cannot shrink below one rank")
        self.check_idle()
        slots = self._slots_for(survivors)
        previous = align_previous(self.placement, self.members, survivors, slots)
        new = await asyncio.to_thread(rebalance, self._load_or_uniform(), slots, previous)
        return (await self._run_event(self._open_event("shrink", survivors), new)).summary()

    def _load_or_uniform(self):
        return self.expert_load if self.expert_load is not None else torch.ones(self.num_moe_layers, self.num_experts)

    def check_idle(self) -> None:
        if self.event is not None:
            raise ScaleBusy(f"a {self.event.kind} to epoch {self.event.epoch} is in progress "
                            f"({self.event.phase.name.lower()}); try again when it ends")

    def _discard(self, rank_ids: list[int]) -> None:
        for rid in rank_ids:
            rec = self.ranks[rid]
            self.send(rid, P.Shutdown())
            rec.job.kill()
            rec.state = RankState.EXITED

    async def _acked(self, kind: str, epoch: int, ranks: list[int], timeout_s: float) -> None:
        """Wait until every rank in `ranks` sent `kind` for `epoch`; raise ScaleFailed on a failure or timeout."""
        def done():
            failed = self._acks.get(("PrepareFailed", epoch), set())
            dead = [r for r in ranks if self.ranks[r].state in (RankState.FAILED, RankState.EXITED)]
            if failed or dead:
                raise ScaleFailed(f"rank(s) {sorted(failed | set(dead))} failed during {kind} of epoch {epoch}")
            return set(ranks) <= self._acks.get((kind, epoch), set())

        await self._wait_for(done, timeout_s, f"{kind} from ranks {ranks}", raise_on_failed=False)

    def _open_event(self, kind: str, new_members: list[int]) -> ScaleEvent:
        self.check_idle()
        # a rolled-back epoch number is never reused, so its store prefixes stay unique
        self.last_epoch_number += 1
        self.event = ScaleEvent(kind, self.last_epoch_number, list(self.members), list(new_members))
        return self.event

    async def _run_event(self, event: ScaleEvent, placement: Placement) -> ScaleEvent:
        kind, old, new_members = event.kind, event.old_members, event.new_members
        ctl = self.cfg.control
        try:
            moves = plan_moves(self.placement, old, placement, new_members, lost=set(event.lost))
            event.experts_moved = sum(1 for m in moves if m.src_rank != m.dst_rank)
            target = P.Epoch(epoch=event.epoch, rank_ids=list(new_members), store_host=ctl.host, store_port=self.store.port,
                             physical_to_logical=placement.physical_to_logical.tolist(), slot_offsets=list(placement.slot_offsets))
            kv = min(self.ranks[r].num_kv_blocks for r in old)
            old_p2l = self.placement.physical_to_logical.tolist()
            old_start = {rid: self.placement.slot_offsets[i] for i, rid in enumerate(old)}

            def src_local_slot(m) -> int:
                if m.src_rank == CHECKPOINT:
                    return -1
                start = old_start[m.src_rank]
                return old_p2l[m.layer].index(m.logical, start) - start

            prepare = P.PrepareEpoch(target=target, participants=event.participants, num_kv_blocks=kv,
                                     source_epoch=self.epoch, recovery=kind == "recover",
                                     moves=[[m.layer, m.logical, m.src_rank, m.dst_rank, m.dst_slot, src_local_slot(m)]
                                            for m in moves])
            log.info("%s: epoch %d -> %d, ranks %s -> %s, %d expert copies", kind, event.epoch - 1, event.epoch, old,
                     new_members, event.experts_moved)
            for rid in event.departing:  # no new requests; in-flight ones move to survivors while experts are copied
                self.ranks[rid].state = RankState.DRAINING
                self._migrate_from(rid, new_members)
            for rid in event.joining:
                self.send(rid, prepare)
            await self._acked("RankStaged", event.epoch, event.joining, ctl.rank_timeout_s * 4)
            # copies over NIXL when every participant has it (decided now: joiners said so when staged); joiners
            # get this second PrepareEpoch too, and start copying on it
            if all(self.ranks[r].nixl for r in event.participants):
                prepare.transfer = "nixl"
            if "broadcast" in event.dense_source.split(","):
                prepare.transfer, prepare.broadcast_dense = "collective", True
            for rid in event.participants:
                self.send(rid, prepare)
            await self._acked("EpochPrepared", event.epoch, event.participants, ctl.rank_timeout_s * 2)
            event.prepare_s = time.monotonic() - event.started
            event.phase = ScalePhase.COMMITTING
            t_commit = time.monotonic()
            for stream in self.streams.values():
                stream.watch_gap = True
            self.wave += 1
            commit = P.CommitEpoch(epoch=event.epoch, wave=self.wave)
            for rid in event.participants:
                self.send(rid, commit)
            self.wave_running = True
            await self._acked("EpochJoined", event.epoch, new_members, ctl.rank_timeout_s)
            await self._acked("EpochLeft", event.epoch, event.departing, ctl.rank_timeout_s)
        except BaseException as e:
            self._roll_back(event, e)
            raise
        event.commit_s = time.monotonic() - t_commit
        self.members, self.placement, self.epoch = list(new_members), placement, event.epoch
        for rid in new_members:
            self.ranks[rid].state = RankState.READY
        for rid in event.departing:
            self._migrate_from(rid, new_members)  # any request that still slipped in
            self.send(rid, P.Shutdown())
            self.ranks[rid].state = RankState.EXITED
        if kind == "recover":  # survivors dropped every request when their group broke: all start again
            event.requests_migrated = self._resend_all(new_members)
        event.phase = ScalePhase.DONE
        self._finish(event)
        log.info("%s done: %s", kind, event.summary())
        return event

    def _roll_back(self, event: ScaleEvent, why: BaseException) -> None:
        event.error = f"{type(why).__name__}: {why}"
        log.error("%s to epoch %d failed, rolling back to epoch %d: %s", event.kind, event.epoch, self.epoch, event.error)
        for rid in event.participants:
            self.send(rid, P.AbortEpoch(epoch=event.epoch))
        for rid in event.departing:
            if self.ranks[rid].state == RankState.DRAINING:
                self.ranks[rid].state = RankState.READY
        self._discard([r for r in event.joining if self.ranks[r].state != RankState.EXITED])
        if self.streams:
            self._start_wave()
        event.phase = ScalePhase.ROLLED_BACK
        self._finish(event)

    def _finish(self, event: ScaleEvent) -> None:
        for stream in self.streams.values():
            stream.watch_gap = False
        self.history.append(event)
        self.event = None
        for key in [k for k in self._acks if k[1] <= event.epoch]:
            del self._acks[key]

    def _resend_all(self, members: list[int]) -> int:
        """Every open stream to the least-loaded member: re-prefill of prompt + tokens so far -> how many."""
        for rec in self.ranks.values():
            rec.in_flight.clear()
        for rid, stream in self.streams.items():
            self._restart_on(rid, stream, members)
        self._start_wave()
        return len(self.streams)

    def _restart_on(self, rid: str, stream, members: list[int]) -> None:
        """Re-send a stream (prompt + tokens so far: re-prefill) to the least-loaded READY rank of `members`."""
        target = min((self.ranks[r] for r in members if self.ranks[r].state == RankState.READY),
                     key=lambda r: (len(r.in_flight), r.rank_id))
        stream.rank_id = target.rank_id
        target.in_flight.add(rid)
        self.send(target.rank_id, P.AddRequest(request_id=rid, prompt_token_ids=stream.prompt_token_ids,
                                               sampling=stream.sampling, output_token_ids=list(stream.output_token_ids)))

    async def recover(self) -> dict:
        """Members died abruptly (no notice, no drain): the survivors re-form a group of a new epoch without them,
        experts they alone held come from replicas on survivors or else the checkpoint, and every open request
        starts again on the survivors from its tokens so far."""
        lost = self._lost_members()
        survivors = [r for r in self.members if r not in lost]
        if not survivors:
            raise ScaleFailed(f"every member ({self.members}) was lost")
        event = self._open_event("recover", survivors)
        event.lost = lost
        if lost:
            event.detect_s = max(0.0, event.started - min(self.ranks[r].last_seen for r in lost))
        try:
            slots = self._slots_for(survivors)
            previous = align_previous(self.placement, self.members, survivors, slots)
            new = await asyncio.to_thread(rebalance, self._load_or_uniform(), slots, previous)
        except BaseException as e:
            self._roll_back(event, e)
            raise
        return (await self._run_event(event, new)).summary()

    def _migrate_from(self, rank_id: int, survivors: list[int]) -> None:
        """Move every request of `rank_id` to the least-loaded survivor: re-prefill of prompt + tokens so far."""
        rec = self.ranks[rank_id]
        if not rec.in_flight:
            return
        self.send(rank_id, P.AbortRequests(request_ids=list(rec.in_flight)))
        for rid in list(rec.in_flight):
            stream = self.streams.get(rid)
            rec.in_flight.discard(rid)
            if stream is None:
                continue
            self._restart_on(rid, stream, survivors)
            if self.event is not None:
                self.event.requests_migrated += 1
        self._start_wave()

    async def _release(self, notice: P.NodeLeaving) -> None:
        """A node must go (scheduler notice): drain its ranks as soon as no other event runs, inside the notice."""
        if self._stopping:  # the whole service is going down (a signal to the process group): nothing to hand off
            return
        log.warning("node job %s leaves in %.0f s (%s): draining ranks %s", notice.job_id, notice.seconds,
                    notice.reason, notice.rank_ids)
        deadline = time.monotonic() + notice.seconds
        while time.monotonic() < deadline:
            members = [r for r in notice.rank_ids if r in self.members]
            if not members:  # never joined (still starting) or already gone: just let them exit
                for rid in notice.rank_ids:
                    if rid in self.ranks and self.ranks[rid].state not in (RankState.EXITED, RankState.FAILED):
                        self.send(rid, P.Shutdown())
                        self.ranks[rid].state = RankState.EXITED
                return
            if self.event is None:
                if len(members) == len(self.members):
                    log.error("node job %s holds every serving rank; nothing can take over its work", notice.job_id)
                    return
                try:
                    await self.shrink(members)
                    return
                except ScaleBusy:
                    pass
                except Exception as e:
                    log.error("draining node job %s failed: %s; retrying while the notice lasts", notice.job_id, e)
            await asyncio.sleep(0.2)
        log.error("node job %s: notice ran out before its ranks could be drained", notice.job_id)

    async def _rebalance_loop(self, period_s: float) -> None:
        while True:
            await asyncio.sleep(period_s)
            if self.event is not None or self.expert_load is None or not self.ready():
                continue
            try:
                log.info("periodic expert rebalance: %s", await self.rebalance_experts())
            except (ScaleBusy, ScaleFailed) as e:
                log.warning("periodic expert rebalance skipped: %s", e)

