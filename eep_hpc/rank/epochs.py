"""The rank's side of the epoch protocol: one object holding what this rank is a member of (its group, its engine)
and the epoch change under way, with an explicit state.

An epoch change, seen from a rank that serves (the head's side is head/scaling):
    PrepareEpoch ─▶ [FETCHING: experts read over NIXL while the rank keeps serving] ─▶ STAGING ──(the step
    boundary every member agrees on)──▶ prepare: experts staged (collective transfers: copied now), the next
    epoch's group built ─▶ PREPARED ──CommitEpoch──▶ COMMITTING ──(agreed boundary)──▶ commit: groups and expert
    tables swapped ─▶ (no change under way). AbortEpoch at any point drops what was staged.
A joining rank (no engine yet) builds its skeleton at its first PrepareEpoch and prepares at its second, with no
step boundary to wait for; a recovery PrepareEpoch (members died) drops the broken group and prepares at once.
"""

from __future__ import annotations

import enum
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

from eep_hpc import protocol as P
from eep_hpc.engine.rank_engine import RankEngine, build_engine, build_skeleton
from eep_hpc.engine.standin import build_standin
from eep_hpc.model.loader import load_dense, load_expert_slot, weight_source
from eep_hpc.model.moe import ExpertParallel
from eep_hpc.parallel.backends import make_all_to_all
from eep_hpc.parallel.eplb import CHECKPOINT
from eep_hpc.parallel.expert_map import ExpertMap
from eep_hpc.parallel.expert_transfer import (
    SlotTensors, StagedExperts, exchange_over_group, fetch_over_nixl, publish_slots, stage_experts,
)
from eep_hpc.parallel.groups import EpochGroup, connect_store
from eep_hpc.parallel.weight_transfer import PendingReads, RankAgent, dense_tensors

log = logging.getLogger("eep_hpc.rank")


class ChangeState(enum.Enum):
    FETCHING = "fetching"  # experts being read from peers over NIXL, in the background of serving
    STAGING = "staging"  # a PrepareEpoch held, waiting for the step boundary every member agrees on
    PREPARED = "prepared"  # experts staged and the next group built: waiting for CommitEpoch
    COMMITTING = "committing"  # a CommitEpoch held, waiting for the agreed step boundary


@dataclass
class EpochChange:
    """The move to one target epoch, from PrepareEpoch to commit or abort."""
    msg: P.PrepareEpoch
    state: ChangeState = ChangeState.STAGING
    staged: StagedExperts | None = None
    group: EpochGroup | None = None  # the target epoch's group (None: this rank leaves)
    expert_map: ExpertMap | None = None
    reg: object = None  # NIXL registration of the staged expert tensors
    reads: PendingReads | None = None  # the NIXL reads under way (FETCHING)
    commit: P.CommitEpoch | None = None
    started: float = field(default_factory=time.monotonic)
    steps_at_start: int | None = None  # a serving member's engine steps when the PrepareEpoch came
    paused_s: float = 0.0  # how long this rank stopped serving for the change so far (starting the reads)
    reported: tuple[float, int] = (0.0, 0)  # when this rank last told the head how far its reads were, and the bytes

    @property
    def epoch(self) -> int:
        return self.msg.target.epoch

    def drop(self, agent) -> bool:
        """Let go of the change: its group now; its staging and registration once no READ it started still writes
        into them (never waits: the rank goes on serving) -> False while some do (then `settle` until True)."""
        if self.group is not None:
            self.group.destroy()
            self.group = None
        return self.settle(agent)

    def settle(self, agent) -> bool:
        """-> True once the READs of a dropped change ended and its staging and registration were let go."""
        if self.reads is not None:
            settled = self.reads.settled()
            if not settled and not self.reads.unknown:
                return False
            if not settled or not self.reads.close(wait_s=0):
                # nixl cannot say whether a READ still writes into the staging tensors, or could not release one:
                # they stay allocated and registered for the life of the process rather than be reused under it
                _UNRELEASED.append((self.reads, self.staged, self.reg))
                self.reg = None
            self.reads = None
        if self.reg is not None:
            agent.deregister(self.reg)
            self.reg = None
        self.staged = None
        return True


_UNRELEASED: list = []  # (reads, staging, registration) of abandoned changes whose READs could not be stopped


def staged_key(epoch: int, rank_id: int) -> str:
    """Set in the store by a participant once its experts for `epoch` are in: members prepare at the boundary only
    when every participant has said so, so none of them waits there for a joiner's reads."""
    return f"staged/{epoch}/{rank_id}"


class RankEpochs:
    """What this rank serves in (group, engine) and the change under way. `send` is the one way out to the head."""

    def __init__(self, launch: P.RankLaunch, send: Callable[[object], None]):
        self.launch, self.id, self.send = launch, launch.rank_id, send
        self.engine: RankEngine | None = None
        self.group: EpochGroup | None = None
        self.epoch_rank = 0
        self.store = None
        self.agent: RankAgent | None = None  # NIXL: what this rank serves to peers, and its reads
        self.weight_transfer = launch.config.parallel.weight_transfer  # "collective" once NIXL turned out missing
        self.change: EpochChange | None = None
        self.served = False  # has been a member of some epoch (a rank without a group then awaits recovery)
        self._retired_collectives = 0  # host collectives of this rank's groups already destroyed
        self.left = False  # a joining rank whose join was called off: the process ends
        self.standin = launch.config.parallel.rank_engine == "standin"  # no model: epochs move groups only
        self._dropped: list[EpochChange] = []  # changes let go of whose READs have not ended yet

    @property
    def host_collectives(self) -> int:
        """Control collectives this rank has run since it started (one per step of a multi-rank epoch)."""
        return self._retired_collectives + (self.group.host_collectives if self.group is not None else 0)

    def _drop(self, change: EpochChange) -> None:
        if not change.drop(self.agent):
            self._dropped.append(change)

    def settle_dropped(self) -> None:
        """Release the staging of dropped changes whose READs ended since (called every loop of the process)."""
        if self._dropped:
            self._dropped = [c for c in self._dropped if not c.settle(self.agent)]

    def _retire(self, group: EpochGroup) -> None:
        self._retired_collectives += group.host_collectives
        group.destroy()

    # ---- what the step agreement carries ------------------------------------------------------------------

    @property
    def prepare_epoch(self) -> int:
        """The epoch this rank is ready to prepare at the next agreed boundary (0: none)."""
        c = self.change
        return c.epoch if c is not None and c.state is ChangeState.STAGING else 0

    @property
    def fetching(self) -> bool:
        """Experts are arriving in the background: the wave goes on (the rank polls between steps)."""
        return self.change is not None and self.change.state is ChangeState.FETCHING

    @property
    def commit_epoch(self) -> int:
        c = self.change
        return c.epoch if c is not None and c.state is ChangeState.COMMITTING else 0

    # ---- messages -----------------------------------------------------------------------------------------

    def on_epoch(self, msg: P.Epoch) -> None:
        """The first epoch: build the engine with this rank's slots and the group."""
        if self.engine is not None:
            raise RuntimeError("an Epoch message is only for the first epoch; later ones go through PrepareEpoch")
        ctl = self.launch.config.control
        if self.store is None:
            self.store = connect_store(msg.store_host, msg.store_port, timeout_s=ctl.rank_timeout_s)
        self.epoch_rank = msg.rank_ids.index(self.id)
        # the members load the model side by side: the group's first collective (KV sizing) waits for the slowest
        self.group = EpochGroup(self.store, msg.epoch, self.epoch_rank, len(msg.rank_ids),
                                torch.device(self.launch.device), timeout_s=ctl.load_timeout_s)
        self.served = True
        if self.standin:  # no model: nothing to publish over NIXL
            self.engine = build_standin(self.launch)
        else:
            self.engine = build_engine(self.launch, msg, self.group)
            self.start_agent()
            self.publish(msg.epoch)
        self.group.set_timeout(ctl.rank_timeout_s)  # serving: a silent peer is given up as soon as the head does
        e = self.engine
        self.send(P.RankReady(rank_id=self.id, num_kv_blocks=e.stats().kv_blocks_total,
                              block_size=self.launch.config.engine.block_size, max_model_len=e.max_model_len,
                              nixl=self.agent is not None))
        self.send(P.EpochJoined(rank_id=self.id, epoch=msg.epoch))

    def on_prepare(self, msg: P.PrepareEpoch) -> bool:
        """-> whether the wave must run (a boundary to agree on)."""
        if self.engine is None:  # joining, first message: build the skeleton, then say RankStaged
            self.stage_joining(msg)
        elif msg.recovery:  # members died: whatever this group was doing is over, and the head re-sends
            self.lose_group(f"recovery to epoch {msg.target.epoch}")  # every open request after the commit
            self.engine.abort_all()  # (also those that reached this rank after its group broke)
            self.prepare(self.begin(EpochChange(msg)))
        elif self.group is None:  # joining, second message (how to copy decided): no step boundary
            self.prepare(self.begin(EpochChange(msg)))
        else:
            change = self.begin(EpochChange(msg, steps_at_start=self.engine.steps))
            if msg.transfer == "nixl" and not self.standin:  # reads need no peer's step: start them, serve on
                t0 = time.monotonic()
                self.stage(change, wait=False)
                change.paused_s += time.monotonic() - t0
            return True
        return False

    def begin(self, change: EpochChange) -> EpochChange:
        """`change` becomes the one under way; one still held (the head moved on from it) is dropped."""
        if self.change is not None and self.change is not change:
            self._drop(self.change)
        self.change = change
        return change

    def on_commit(self, msg: P.CommitEpoch) -> bool:
        """-> True when the commit waits for a step boundary the members agree on (a rank with no group, joining
        or recovering, commits as soon as the process calls `commit`)."""
        c = self.change
        if c is None or c.state is not ChangeState.PREPARED or c.epoch != msg.epoch:
            self.send(P.PrepareFailed(rank_id=self.id, epoch=msg.epoch, error="commit of an epoch never prepared"))
            return False
        c.commit, c.state = msg, ChangeState.COMMITTING
        return self.group is not None

    def on_abort(self, epoch: int) -> None:
        c = self.change
        if c is not None and c.epoch == epoch:
            self._drop(c)
            self.change = None
        if self.group is None and not self.served:  # a joining rank whose join was called off
            self.left = True

    def lose_group(self, why: str) -> None:
        """The epoch's group is unusable (a peer died): drop it and every request (the head re-sends them after
        the recovery commit), keep the model and KV cache, and wait for the head's recovery PrepareEpoch."""
        if self.group is None:
            return
        epoch = self.group.epoch
        log.warning("rank %d: lost the group of epoch %d (%s); dropping %d request(s), awaiting recovery",
                    self.id, epoch, why, self.engine.abort_all())
        self._retire(self.group)
        self.group = None
        if self.change is not None:
            self._drop(self.change)
            self.change = None
        self.send(P.GroupLost(rank_id=self.id, epoch=epoch, error=why))

    # ---- joining ------------------------------------------------------------------------------------------

    def stage_joining(self, msg: P.PrepareEpoch) -> None:
        target = msg.target
        i = target.rank_ids.index(self.id)
        if self.store is None:
            self.store = connect_store(target.store_host, target.store_port,
                                       timeout_s=self.launch.config.control.rank_timeout_s)
        if self.standin:
            self.engine = build_standin(self.launch)
            self.send(P.RankStaged(rank_id=self.id, epoch=target.epoch, dense_source="none", dense_bytes=0,
                                   dense_seconds=0.0))
            return
        got = {}

        def fill_dense(model):
            """From a peer over NIXL; else by a broadcast from a peer during prepare (say "broadcast" and leave
            them empty for now); the checkpoint only when no peer serves (weight_transfer = "checkpoint")."""
            t0 = time.monotonic()
            peers = [r for r in msg.participants if r != self.id]
            if self.start_agent():
                try:
                    peer, nbytes = self.agent.fetch_dense(peers, dense_tensors(model),
                                                          on_progress=self._progress_reporter(target.epoch),
                                                          gbps=self.launch.config.parallel.transfer_gbps)
                    got.update(source=f"nixl:{peer}", nbytes=nbytes, seconds=time.monotonic() - t0)
                    return
                except Exception as e:  # nixl missing or no peer readable: a collective broadcast instead
                    log.warning("rank %d: dense weights over NIXL failed (%s); asking for a broadcast", self.id, e)
            if self.weight_transfer != "checkpoint" and peers:
                got.update(source="broadcast", nbytes=0, seconds=0.0)
                return
            load_dense(model, weight_source(self.launch.config.model, Path(self.launch.model_dir),
                                            model.lm_head.weight.device))
            got.update(source="checkpoint", nbytes=sum(t.numel() * t.element_size() for t in dense_tensors(model).values()),
                       seconds=time.monotonic() - t0)

        self.engine = build_skeleton(self.launch, target.slot_offsets[i + 1] - target.slot_offsets[i],
                                     msg.num_kv_blocks, fill_dense)
        self.send(P.RankStaged(rank_id=self.id, epoch=target.epoch, dense_source=got["source"],
                               dense_bytes=got["nbytes"], dense_seconds=got["seconds"], nixl=self.agent is not None))

    def start_agent(self) -> bool:
        """The NIXL agent, when configured and nixl works here; without it weights move over collectives."""
        if self.agent is None and self.weight_transfer == "nixl":
            try:
                self.agent = RankAgent(self.id, self.store)
            except Exception as e:
                log.warning("rank %d: no NIXL (%s): weights move over collectives and the checkpoint", self.id, e)
                self.weight_transfer = "collective"
        return self.agent is not None

    def publish(self, epoch: int, expert_reg=None) -> None:
        """Offer this rank's dense weights (once) and this epoch's expert slots to peers over NIXL."""
        if self.agent is None:
            return
        blocks = self.engine.model.moe_blocks()
        try:
            if not self.agent.dense_published:
                self.agent.publish_dense(dense_tensors(self.engine.model))
            publish_slots(self.agent, epoch, SlotTensors.of_blocks(blocks), expert_reg)
            self.agent.retire_experts(keep_epoch=epoch)
        except Exception as e:
            log.warning("rank %d: cannot publish weights over NIXL (%s)", self.id, e)

    # ---- prepare (in the background of serving), commit (at a step boundary) ------------------------------

    def prepare(self, change: EpochChange | None = None) -> None:
        """Stage the experts this rank will newly own (unless fetched in the background already) and build the
        target epoch's group -> PREPARED."""
        change = change or self.change
        target, t0 = change.msg.target, time.monotonic()
        if not self.standin and change.staged is None and not self.stage(change, wait=True):
            return
        try:
            if self.id in target.rank_ids:
                i = target.rank_ids.index(self.id)
                device = torch.device(self.launch.device)
                change.group = self.serving_group(target.epoch, i, len(target.rank_ids), device)
                if not self.standin:
                    change.expert_map = ExpertMap(target.physical_to_logical, target.slot_offsets, i,
                                                  self.engine.model.arch.num_experts, device)
        except Exception as e:
            self.fail(change, e)
            return
        change.state = ChangeState.PREPARED
        now = time.monotonic()
        log.info("rank %d: epoch %d prepared after %.2f s", self.id, target.epoch, now - change.started)
        served = self.engine.steps - change.steps_at_start if change.steps_at_start is not None else 0
        self.send(P.EpochPrepared(rank_id=self.id, epoch=target.epoch,
                                  bytes_received=change.staged.bytes_received if change.staged else 0,
                                  seconds=now - change.started, pause_s=change.paused_s + now - t0,
                                  served_steps=served))

    def stage(self, change: EpochChange, wait: bool) -> bool:
        """Stage the experts of the target epoch: local copies now, remote ones over NIXL (`wait` False: the reads
        go on in the background -> FETCHING, `poll` finishes them) or over a transfer group of all participants
        (at an agreed boundary). -> False when it failed (PrepareFailed sent, the change dropped)."""
        msg = change.msg
        target = msg.target
        device = torch.device(self.launch.device)
        xfer = None
        try:
            arch = self.engine.model.arch
            member = self.id in target.rank_ids
            i = target.rank_ids.index(self.id) if member else 0
            start, end = (target.slot_offsets[i], target.slot_offsets[i + 1]) if member else (0, 0)
            blocks = self.engine.model.moe_blocks()
            mine = SlotTensors.of_blocks(blocks)
            old = mine if self.engine.ep else None
            shape = (arch.moe_intermediate_size, arch.hidden_size)
            # experts whose every holder died come from the checkpoint; the rest move between live ranks
            # a member keeps its slot tensors while they hold its new count (a grow leaves the rows past it idle:
            # no token is routed there), so what CUDA graphs captured stays valid; a joiner fills its empty ones
            joining = member and old is None and blocks[0].w13.shape[0] == end - start
            in_place = member and old is not None and blocks[0].w13.shape[0] >= end - start
            staged, remote = stage_experts(self.id, msg.moves, old, start, end, len(blocks), shape,
                                           blocks[0].w13.dtype, device, like=mine, into=mine if joining else None,
                                           in_place=in_place)
            self.load_from_checkpoint([m for m in remote if m[2] == CHECKPOINT], staged, start)
            remote = [m for m in remote if m[2] != CHECKPOINT]
            moves = [m for m in msg.moves if m[2] != CHECKPOINT]
            change.staged = staged
            if msg.transfer == "nixl":
                if device.type == "cuda":  # READs land outside stream order: the staging memory must be idle
                    torch.cuda.current_stream(device).synchronize()
                gbps = 0.0 if wait else self.launch.config.parallel.transfer_gbps  # no cap when nothing is served
                change.reads, change.reg = fetch_over_nixl(self.agent, msg.source_epoch, staged, remote, start, gbps)
                change.state = ChangeState.FETCHING
                log.info("rank %d: epoch %d: reading %.1f MiB of %d expert slot(s) from rank(s) %s over NIXL%s "
                         "(staged after %.2f s)", self.id, target.epoch, change.reads.nbytes / 2**20, len(remote),
                         sorted({m[2] for m in remote}), f" at <= {gbps:g} GB/s" if gbps else "",
                         time.monotonic() - change.started)
                return self.poll(change, wait=True) if wait else True
            xfer = EpochGroup(self.store, target.epoch, msg.participants.index(self.id), len(msg.participants),
                              device, timeout_s=self.launch.config.control.transfer_timeout_s, purpose="xfer/")
            broadcast_bytes = 0
            if msg.broadcast_dense:  # a joiner could not read them over NIXL: participant 0 sends them to all
                for t in dense_tensors(self.engine.model).values():
                    xfer.broadcast(t, src=0)
                    broadcast_bytes += t.numel() * t.element_size()
            if self.engine.ep is not None:  # it had them already
                broadcast_bytes = 0
            staged.bytes_received = broadcast_bytes + exchange_over_group(xfer, msg.participants, self.id, moves,
                                                                          old, staged, start, len(blocks), shape)
            return True
        except Exception as e:
            self.fail(change, e)
            return False
        finally:
            if xfer is not None:
                xfer.destroy()

    def poll(self, change: EpochChange | None = None, wait: bool = False) -> bool:
        """Check the background reads (FETCHING). Once they are in, the rank says so in the store; a serving
        member's change turns STAGING (ready for the agreed boundary) when every participant has said so. `wait`
        (a rank that serves nothing meanwhile): until its reads are in. -> False when they failed (PrepareFailed
        sent, the change dropped)."""
        change = change or self.change
        if change is None or change.state is not ChangeState.FETCHING:
            return True
        try:
            if change.reads is not None:
                if wait:
                    change.reads.wait(on_progress=lambda n: self._report_progress(change, n))
                elif not change.reads.done():
                    self._report_progress(change, change.reads.bytes_done)
                    return True
                change.staged.bytes_received = change.reads.nbytes
                log.info("rank %d: epoch %d: expert reads in: %.1f MiB after %.2f s", self.id, change.epoch,
                         change.reads.nbytes / 2**20, time.monotonic() - change.started)
                change.reads.close()
                change.reads = None
                self.store.set(staged_key(change.epoch, self.id), b"1")
            if not wait and not self.store.check([staged_key(change.epoch, r) for r in change.msg.participants]):
                return True
            change.state = ChangeState.STAGING
            return True
        except Exception as e:
            self.fail(change, e)
            return False

    def _report_progress(self, change: EpochChange, bytes_done: int) -> None:
        """Tell the head the expert reads go on (see `_tell_progress`)."""
        change.reported = self._tell_progress(change.epoch, change.reported, bytes_done, change.reads.nbytes)

    def _progress_reporter(self, epoch: int) -> Callable[[int, int], None]:
        """on_progress for a joiner's dense read: the head waits for RankStaged from the latest PrepareProgress."""
        state = [(0.0, 0)]

        def report(bytes_done: int, bytes_total: int) -> None:
            state[0] = self._tell_progress(epoch, state[0], bytes_done, bytes_total)
        return report

    def _tell_progress(self, epoch: int, reported: tuple[float, int], bytes_done: int, bytes_total: int
                       ) -> tuple[float, int]:
        """Send PrepareProgress about every heartbeat while more bytes came in since the last one -> the new
        (time, bytes) of the latest report."""
        at, last = reported
        now = time.monotonic()
        if bytes_done <= last or now - at < self.launch.config.control.heartbeat_s:
            return reported
        log.debug("rank %d: epoch %d: reads %d of %d bytes in", self.id, epoch, bytes_done, bytes_total)
        self.send(P.PrepareProgress(rank_id=self.id, epoch=epoch, bytes_received=bytes_done, bytes_total=bytes_total))
        return now, bytes_done

    def fail(self, change: EpochChange, e: Exception) -> None:
        log.error("rank %d: prepare of epoch %d failed: %s: %s", self.id, change.epoch, type(e).__name__, e,
                  exc_info=e)
        self._drop(change)
        if self.change is change:
            self.change = None
        self.send(P.PrepareFailed(rank_id=self.id, epoch=change.epoch, error=f"{type(e).__name__}: {e}"))

    def serving_group(self, epoch: int, rank: int, size: int, device: torch.device) -> EpochGroup:
        """The group of a prepared epoch: its members meet once each has copied its experts (the slowest may take
        load_timeout_s); serving, it waits on a silent peer as long as the head does before declaring it dead."""
        ctl = self.launch.config.control
        group = EpochGroup(self.store, epoch, rank, size, device, timeout_s=ctl.load_timeout_s)
        group.set_timeout(ctl.rank_timeout_s)
        return group

    def load_from_checkpoint(self, moves: list[list[int]], staged: StagedExperts, start: int) -> None:
        """Experts no live rank holds (their holders died), read from the checkpoint into staging."""
        if not moves:
            return
        model = self.engine.model
        source = weight_source(self.launch.config.model, Path(self.launch.model_dir), model.lm_head.weight.device)
        blocks = model.moe_blocks()
        for layer, logical, _, _, dst_slot, _ in moves:
            into = SimpleNamespace(w13=staged.w13[layer], w2=staged.w2[layer], fp8_block=blocks[layer].fp8_block,
                                   w13_scale=staged.w13_scale[layer] if staged.w13_scale is not None else None,
                                   w2_scale=staged.w2_scale[layer] if staged.w2_scale is not None else None)
            load_expert_slot(model, source, layer, staged.row(layer, dst_slot - start), logical, into=into)
        log.info("rank %d: %d expert(s) restored from the checkpoint", self.id, len(moves))

    def commit(self) -> int | None:
        """Switch to the prepared epoch -> the wave this rank serves in now (None: it left the group)."""
        change, self.change = self.change, None
        target, msg = change.msg.target, change.commit
        old_group = self.group
        wave = None
        if change.group is not None:
            if not self.standin:
                arch = self.engine.model.arch
                a2a = make_all_to_all(self.launch.config, arch, target, change.group, change.expert_map)
                ep = ExpertParallel(change.expert_map, a2a, arch.num_experts)
                in_place = change.staged.rows is not None
                # each rank for itself: one that drops its graphs (or joined) captures each size in a capture
                # round with those that kept theirs (parallel/step_plan.py)
                keep = (in_place and self.engine.ep is not None and ep.can_replace(self.engine.ep)
                        and os.environ.get("EEP_HPC_KEEP_GRAPHS", "1") != "0")  # 0: the before of a benchmark
                self.engine.swap_experts(change.staged, ep, keep_graphs=keep)
                log.info("rank %d: epoch %d: %s, %s", self.id, msg.epoch,
                         f"{sum(map(len, change.staged.rows))} expert slot(s) updated in place" if in_place
                         else "expert slots replaced",
                         "step path kept (tables and CUDA graphs)" if keep else "graphs dropped (re-captured on use)")
                if in_place and self.agent is not None:  # the live tensors stay what peers read
                    if change.reg is not None:
                        self.agent.deregister(change.reg)
                    change.reg = self.agent.take_expert_registration()
            self.group, self.epoch_rank, self.served = change.group, target.rank_ids.index(self.id), True
            wave = msg.wave
            self.send(P.EpochJoined(rank_id=self.id, epoch=msg.epoch))
            self.publish(msg.epoch, change.reg)
        else:
            self.group = None
            self.send(P.EpochLeft(rank_id=self.id, epoch=msg.epoch))
        if old_group is not None:
            self._retire(old_group)
        return wave
