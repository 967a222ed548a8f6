"""The rank process: a thin wrapper that feeds a RankEngine from the head's ZMQ socket and steps it in waves.

Loop: idle ranks block on their socket (no spinning). A Wake for the current wave makes a rank active; active ranks
run one collective per iteration (does anyone have work?) and, if so, one model step together. When nobody has
work, all leave the wave at the same iteration and epoch rank 0 reports WaveDone. A rank that hears nothing from
the head for `head_timeout_s` exits: the head is gone.
"""

from __future__ import annotations

import faulthandler
from dataclasses import dataclass
import logging
import os
import signal
import socket
import time
import traceback
from types import SimpleNamespace

import torch
import zmq

from eep_hpc import protocol as P
from eep_hpc.engine.rank_engine import RankEngine, build_engine, build_skeleton
from eep_hpc.model.moe import ExpertParallel
from eep_hpc.parallel.all_to_all import make_all_to_all
from eep_hpc.parallel.expert_map import ExpertMap
from eep_hpc.parallel.expert_transfer import (
    SlotTensors, StagedExperts, exchange_over_group, fetch_over_nixl, publish_slots, stage_experts,
)
from eep_hpc.parallel.eplb import CHECKPOINT
from eep_hpc.parallel.groups import EpochGroup, GroupLost, connect_store
from eep_hpc.parallel.weight_transfer import RankAgent, dense_tensors
from eep_hpc.model.loader import load_dense, load_expert_slot, weight_source
from pathlib import Path

log = logging.getLogger("eep_hpc.rank")


class RankProcess:
    def __init__(self, launch: P.RankLaunch):
        self.launch = launch
        self.id = launch.rank_id
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, P.rank_identity(self.id))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(launch.head_address)
        self.engine: RankEngine | None = None
        self.group: EpochGroup | None = None
        self.epoch_rank = 0
        self.store = None
        self.wave = 0
        self.active = False
        self.stopping = False
        self.last_heard = time.monotonic()
        # scaling: a PrepareEpoch not yet carried out, its result, and a CommitEpoch not yet carried out
        self.pending_prepare: P.PrepareEpoch | None = None
        self.prepared: Prepared | None = None
        self.pending_commit: P.CommitEpoch | None = None
        self.agent: RankAgent | None = None  # NIXL: what this rank serves to peers, and its reads
        self.notice: str = ""  # set by a termination signal: ask the head to drain this rank, once
        self.served = False  # has been a member of some epoch (a rank without a group then awaits recovery)

    def send(self, msg) -> None:
        self.sock.send(P.encode(msg), copy=False)

    def run(self) -> int:
        ctl = self.launch.config.control
        self.send(P.RankHello(protocol_version=P.PROTOCOL_VERSION, rank_id=self.id, pid=os.getpid(),
                              host=socket.gethostname(), device=self.launch.device))
        try:
            while not self.stopping:
                self.drain(timeout_ms=0 if self.active else int(ctl.heartbeat_s * 1000))
                # judged right after draining: a long prepare must not count the pings queued meanwhile as missing
                if time.monotonic() - self.last_heard > ctl.head_timeout_s:
                    log.error("rank %d: no word from the head for %.0f s, exiting", self.id, ctl.head_timeout_s)
                    return 1
                if self.notice:
                    self.send(P.NodeLeaving(job_id=f"rank-{self.id}", rank_ids=[self.id],
                                            seconds=ctl.leave_notice_s, reason=self.notice))
                    self.notice = ""
                if self.active and not self.stopping:
                    try:
                        self.step_wave()
                    except GroupLost as e:
                        self.lose_group(str(e))
            return 0
        except Exception as e:
            log.exception("rank %d failed", self.id)
            self.send(P.RankFailed(rank_id=self.id, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            return 1
        finally:
            if self.group is not None:
                self.group.destroy()
            self.sock.close(linger=0)
            self.ctx.term()

    def drain(self, timeout_ms: int) -> None:
        """Handle every queued message; wait up to timeout_ms for the first one."""
        if not self.sock.poll(timeout_ms):
            return
        while not self.stopping:
            try:
                data = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = P.decode_for_rank(data)
            except P.BadMessage as e:  # not from this run's head: dropped, and not counted as hearing from it
                P.log_dropped(log, self.launch.head_address, e)
                continue
            self.last_heard = time.monotonic()
            self.handle(msg)

    def handle(self, msg) -> None:
        match msg:
            case P.AddRequest():
                self.add(msg)
            case P.AbortRequests(request_ids=ids):
                self.engine.abort(ids)
            case P.Wake(wave=w):
                if w >= self.wave and self.group is not None:
                    self.wave, self.active = w, True
            case P.Ping(sent_at=t):
                stats = self.engine.stats(with_load=True) if self.engine else P.RankStats()
                self.send(P.Pong(rank_id=self.id, sent_at=t, stats=stats))
            case P.Epoch():
                self.join_epoch(msg)
            case P.PrepareEpoch():
                if self.engine is None:  # joining, first message: build the skeleton, then say RankStaged
                    self.stage_joining(msg)
                elif msg.recovery:  # members died: whatever this group was doing is over, and the head re-sends
                    self.lose_group(f"recovery to epoch {msg.target.epoch}")  # every open request after the
                    self.engine.abort_all()  # commit (also those that reached this rank after its group broke)
                    self.prepare(msg)
                elif self.group is None:  # joining, second message (how to copy decided): no step boundary
                    self.prepare(msg)
                else:
                    self.pending_prepare, self.active = msg, True
            case P.CommitEpoch():
                if self.group is None:
                    self.commit(msg)
                else:
                    self.pending_commit, self.active = msg, True
            case P.AbortEpoch(epoch=e):
                self.abort_epoch(e)
            case P.Shutdown():
                self.stopping = True

    def add(self, msg: P.AddRequest) -> None:
        vocab = self.engine.model.arch.vocab_size
        bad = next((t for t in msg.prompt_token_ids + msg.output_token_ids if not 0 <= t < vocab), None)
        if bad is not None or not msg.prompt_token_ids:
            why = f"token id {bad} is outside the vocabulary [0, {vocab})" if bad is not None else "empty prompt"
            out = P.RequestOutput(request_id=msg.request_id, new_token_ids=[], finish_reason="error", error=why)
            self.send(P.StepOutputs(rank_id=self.id, outputs=[out], stats=self.engine.stats()))
            return
        self.engine.add(msg)

    def step_wave(self) -> None:
        """One iteration of the wave: agree on work and on scaling actions every member has received, then act."""
        prep = self.pending_prepare.target.epoch if self.pending_prepare else 0
        com = self.pending_commit.epoch if self.pending_commit else 0
        busy, neg_prep, neg_com = self.group.all_reduce_max([int(self.engine.has_work() or prep or com), -prep, -com])
        if prep and -neg_prep == prep:  # every member has the PrepareEpoch
            msg, self.pending_prepare = self.pending_prepare, None
            self.prepare(msg)
            return
        if com and -neg_com == com:
            msg, self.pending_commit = self.pending_commit, None
            self.commit(msg)
            return
        if not busy:
            self.active = False
            if self.epoch_rank == 0:
                self.send(P.WaveDone(rank_id=self.id, wave=self.wave))
            self.wave += 1
            return
        outputs = self.engine.step()
        masked = getattr(self.engine.ep.all_to_all, "failed_ranks", None)
        if masked is not None and masked():  # nixl_ep timed a peer out and masked it: this epoch is broken
            raise GroupLost(f"nixl_ep masked rank(s) {masked()}")
        if outputs:
            self.send(P.StepOutputs(rank_id=self.id, outputs=outputs, stats=self.engine.stats()))

    def lose_group(self, why: str) -> None:
        """The epoch's group is unusable (a peer died): drop it and every request (the head re-sends them after
        the recovery commit), keep the model and KV cache, and wait for the head's recovery PrepareEpoch."""
        if self.group is None:
            return
        epoch = self.group.epoch
        log.warning("rank %d: lost the group of epoch %d (%s); dropping %d request(s), awaiting recovery",
                    self.id, epoch, why, self.engine.abort_all())
        self.group.destroy()
        self.group, self.active, self.pending_prepare, self.pending_commit = None, False, None, None
        self.send(P.GroupLost(rank_id=self.id, epoch=epoch, error=why))

    def join_epoch(self, msg: P.Epoch) -> None:
        ctl = self.launch.config.control
        if self.store is None:
            self.store = connect_store(msg.store_host, msg.store_port, timeout_s=ctl.rank_timeout_s)
        self.epoch_rank = msg.rank_ids.index(self.id)
        group = EpochGroup(self.store, msg.epoch, self.epoch_rank, len(msg.rank_ids), torch.device(self.launch.device),
                           timeout_s=ctl.rank_timeout_s)
        if self.engine is None:
            self.group, self.served = group, True
            self.engine = build_engine(self.launch, msg, group)
            self.start_agent()
            self.publish(msg.epoch)
            e = self.engine
            self.send(P.RankReady(rank_id=self.id, num_kv_blocks=e.block_manager.num_free_blocks,
                                  block_size=self.launch.config.engine.block_size, max_model_len=e.max_model_len,
                                  nixl=self.agent is not None))
        else:
            raise RuntimeError("an Epoch message is only for the first epoch; later ones go through PrepareEpoch")
        self.send(P.EpochJoined(rank_id=self.id, epoch=msg.epoch))

    # ---- scaling: prepare (in the background of serving), commit (at a step boundary), abort ----------------

    def stage_joining(self, msg: P.PrepareEpoch) -> None:
        target = msg.target
        i = target.rank_ids.index(self.id)
        if self.store is None:
            self.store = connect_store(target.store_host, target.store_port,
                                       timeout_s=self.launch.config.control.rank_timeout_s)
        got = {}

        def fill_dense(model):
            """From a peer over NIXL; else by a broadcast from a peer during prepare (say "broadcast" and leave
            them empty for now); the checkpoint only when no peer serves (weight_transfer = "checkpoint")."""
            t0 = time.monotonic()
            peers = [r for r in msg.participants if r != self.id]
            mode = self.launch.config.parallel.weight_transfer
            if self.start_agent():
                try:
                    peer, nbytes = self.agent.fetch_dense(peers, dense_tensors(model))
                    got.update(source=f"nixl:{peer}", nbytes=nbytes, seconds=time.monotonic() - t0)
                    return
                except Exception as e:  # nixl missing or no peer readable: a collective broadcast instead
                    log.warning("rank %d: dense weights over NIXL failed (%s); asking for a broadcast", self.id, e)
            if mode != "checkpoint" and peers:
                got.update(source="broadcast", nbytes=0, seconds=0.0)
                return
            load_dense(model, weight_source(self.launch.config.model, Path(self.launch.model_dir), model.lm_head.weight.device))
            got.update(source="checkpoint", nbytes=sum(t.numel() * t.element_size() for t in dense_tensors(model).values()),
                       seconds=time.monotonic() - t0)

        self.engine = build_skeleton(self.launch, target.slot_offsets[i + 1] - target.slot_offsets[i],
                                     msg.num_kv_blocks, fill_dense)
        self.send(P.RankStaged(rank_id=self.id, epoch=target.epoch, dense_source=got["source"],
                               dense_bytes=got["nbytes"], dense_seconds=got["seconds"], nixl=self.agent is not None))

    def start_agent(self) -> bool:
        """The NIXL agent, when configured and nixl works here; without it weights move over collectives."""
        if self.agent is None and self.launch.config.parallel.weight_transfer == "nixl":
            try:
                self.agent = RankAgent(self.id, self.store)
            except Exception as e:
                log.warning("rank %d: no NIXL (%s): weights move over collectives and the checkpoint", self.id, e)
                self.launch.config.parallel.weight_transfer = "collective"
        return self.agent is not None

    def publish(self, epoch: int, expert_reg=None) -> None:
        """Offer this rank's dense weights (once) and this epoch's expert slots to peers over NIXL."""
        if self.agent is None:
            return
        blocks = self.engine.model.moe_blocks()
        try:
            if self.agent._dense_reg is None:
                self.agent.publish_dense(dense_tensors(self.engine.model))
            publish_slots(self.agent, epoch, SlotTensors.of_blocks(blocks), expert_reg)
            self.agent.retire_experts(keep_epoch=epoch)
        except Exception as e:
            log.warning("rank %d: cannot publish weights over NIXL (%s)", self.id, e)

    def prepare(self, msg: P.PrepareEpoch) -> None:
        target, t0 = msg.target, time.monotonic()
        device = torch.device(self.launch.device)
        timeout = self.launch.config.control.transfer_timeout_s
        xfer = new_group = reg = None
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
            joining = old is None and member and blocks[0].w13.shape[0] == end - start
            staged, remote = stage_experts(self.id, msg.moves, old, start, end, len(blocks), shape,
                                           blocks[0].w13.dtype, device, like=mine, into=mine if joining else None)
            self.load_from_checkpoint([m for m in remote if m[2] == CHECKPOINT], staged, start)
            remote = [m for m in remote if m[2] != CHECKPOINT]
            moves = [m for m in msg.moves if m[2] != CHECKPOINT]
            if msg.transfer == "nixl":
                staged.bytes_received, reg = fetch_over_nixl(self.agent, msg.source_epoch, staged, remote, start)
            else:
                xfer = EpochGroup(self.store, target.epoch, msg.participants.index(self.id), len(msg.participants),
                                  device, timeout_s=timeout, purpose="xfer/")
                broadcast_bytes = 0
                if msg.broadcast_dense:  # a joiner could not read them over NIXL: participant 0 sends them to all
                    for t in dense_tensors(self.engine.model).values():
                        xfer.broadcast(t, src=0)
                        broadcast_bytes += t.numel() * t.element_size()
                if self.engine.ep is not None:  # it had them already
                    broadcast_bytes = 0
                staged.bytes_received = broadcast_bytes + exchange_over_group(xfer, msg.participants, self.id, moves,
                                                                              old, staged, start, len(blocks), shape)
                xfer.destroy()
                xfer = None
            if member:
                new_group = EpochGroup(self.store, target.epoch, i, len(target.rank_ids), device, timeout_s=timeout)
                expert_map = ExpertMap(target.physical_to_logical, target.slot_offsets, i, arch.num_experts, device)
                self.prepared = Prepared(msg, staged, new_group, expert_map, reg)
            else:
                self.prepared = Prepared(msg, staged, None, None, reg)
            self.send(P.EpochPrepared(rank_id=self.id, epoch=target.epoch, bytes_received=staged.bytes_received,
                                      seconds=time.monotonic() - t0))
        except Exception as e:
            log.exception("rank %d: prepare of epoch %d failed", self.id, target.epoch)
            for g in (xfer, new_group):
                if g is not None:
                    g.destroy()
            if reg is not None:
                self.agent.deregister(reg)
            self.prepared = None
            self.send(P.PrepareFailed(rank_id=self.id, epoch=target.epoch, error=f"{type(e).__name__}: {e}"))

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
            load_expert_slot(model, source, layer, dst_slot - start, logical, into=into)
        log.info("rank %d: %d expert(s) restored from the checkpoint", self.id, len(moves))

    def commit(self, msg: P.CommitEpoch) -> None:
        prepared = self.prepared
        if prepared is None or prepared.msg.target.epoch != msg.epoch:
            self.send(P.PrepareFailed(rank_id=self.id, epoch=msg.epoch, error="commit of an epoch never prepared"))
            return
        self.prepared = None
        target = prepared.msg.target
        old_group = self.group
        if prepared.group is not None:
            arch = self.engine.model.arch
            a2a = make_all_to_all(self.launch.config, arch, target, prepared.group, prepared.expert_map)
            ep = ExpertParallel(prepared.expert_map, a2a, arch.num_experts)
            self.engine.swap_experts(prepared.staged, ep)
            self.group, self.epoch_rank, self.served = prepared.group, target.rank_ids.index(self.id), True
            self.wave, self.active = msg.wave, True
            self.send(P.EpochJoined(rank_id=self.id, epoch=msg.epoch))
            self.publish(msg.epoch, prepared.reg)
        else:
            self.group, self.active = None, False
            self.send(P.EpochLeft(rank_id=self.id, epoch=msg.epoch))
        if old_group is not None:
            old_group.destroy()

    def abort_epoch(self, epoch: int) -> None:
        if self.pending_prepare is not None and self.pending_prepare.target.epoch == epoch:
            self.pending_prepare = None
        if self.pending_commit is not None and self.pending_commit.epoch == epoch:
            self.pending_commit = None
        if self.prepared is not None and self.prepared.msg.target.epoch == epoch:
            if self.prepared.group is not None:
                self.prepared.group.destroy()
            if self.prepared.reg is not None:
                self.agent.deregister(self.prepared.reg)
            self.prepared = None
        if self.group is None and not self.served:  # a joining rank whose join was called off
            self.stopping = True


@dataclass
class Prepared:
    msg: P.PrepareEpoch
    staged: StagedExperts
    group: EpochGroup | None
    expert_map: ExpertMap | None
    reg: object = None  # NIXL registration of the staged expert tensors


def run_rank(launch: P.RankLaunch) -> int:
    """Entry point of a rank process (called by the launcher)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{launch.rank_id} %(levelname)s %(message)s")
    faulthandler.register(signal.SIGQUIT, all_threads=True)  # `kill -QUIT <pid>` prints where a rank is stuck
    if launch.device.startswith("cuda"):
        # a collective stuck on a dead peer times out by aborting its communicator, not by killing this process
        # (torch's default): the survivor then reports GroupLost and takes part in the recovery
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        torch.cuda.set_device(torch.device(launch.device))
    torch.set_num_threads(max(1, int(os.environ.get("EEP_HPC_RANK_THREADS", "1"))))
    P.use_secret(P.read_secret(launch.config.control.secret_file))  # before the socket: its identity derives from it
    rank = RankProcess(launch)

    def on_term(signum, frame):  # scancel / preemption / a user's kill: leave in order, not abruptly
        rank.notice = signal.Signals(signum).name

    if not os.environ.get("EEP_HPC_NODE_AGENT"):  # under a node agent, the agent reports the node's notice
        signal.signal(signal.SIGTERM, on_term)
    return rank.run()
