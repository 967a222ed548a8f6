"""The rank process: a thin wrapper that feeds a RankEngine from the head's ZMQ socket and steps it in waves.

Loop: idle ranks block on their socket (no spinning). A Wake for the current wave makes a rank active; active ranks
run one collective per iteration (does anyone have work?) and, if so, one model step together. When nobody has
work, all leave the wave at the same iteration and epoch rank 0 reports WaveDone. A rank that hears nothing from
the head for `head_timeout_s` exits: the head is gone.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback

import torch
import zmq

from eep_hpc import protocol as P
from eep_hpc.engine.rank_engine import RankEngine, build_engine
from eep_hpc.parallel.groups import EpochGroup, connect_store

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

    def send(self, msg) -> None:
        self.sock.send(P.encode(msg), copy=False)

    def run(self) -> int:
        ctl = self.launch.config.control
        self.send(P.RankHello(protocol_version=P.PROTOCOL_VERSION, rank_id=self.id, pid=os.getpid(),
                              host=socket.gethostname(), device=self.launch.device))
        try:
            while not self.stopping:
                if self.active:
                    self.drain(timeout_ms=0)
                    self.step_wave()
                else:
                    self.drain(timeout_ms=int(ctl.heartbeat_s * 1000))
                if time.monotonic() - self.last_heard > ctl.head_timeout_s:
                    log.error("rank %d: no word from the head for %.0f s, exiting", self.id, ctl.head_timeout_s)
                    return 1
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
            self.last_heard = time.monotonic()
            self.handle(P.decode_for_rank(data))

    def handle(self, msg) -> None:
        match msg:
            case P.AddRequest():
                self.add(msg)
            case P.AbortRequests(request_ids=ids):
                self.engine.abort(ids)
            case P.Wake(wave=w):
                if w >= self.wave:
                    self.wave, self.active = w, True
            case P.Ping(sent_at=t):
                stats = self.engine.stats(with_load=True) if self.engine else P.RankStats()
                self.send(P.Pong(rank_id=self.id, sent_at=t, stats=stats))
            case P.Epoch():
                self.join_epoch(msg)
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
        busy = self.group.all_reduce_max([int(self.engine.has_work())])[0]
        if not busy:
            self.active = False
            if self.epoch_rank == 0:
                self.send(P.WaveDone(rank_id=self.id, wave=self.wave))
            self.wave += 1
            return
        outputs = self.engine.step()
        if outputs:
            self.send(P.StepOutputs(rank_id=self.id, outputs=outputs, stats=self.engine.stats()))

    def join_epoch(self, msg: P.Epoch) -> None:
        ctl = self.launch.config.control
        if self.store is None:
            self.store = connect_store(msg.store_host, msg.store_port, timeout_s=ctl.rank_timeout_s)
        self.epoch_rank = msg.rank_ids.index(self.id)
        group = EpochGroup(self.store, msg.epoch, self.epoch_rank, len(msg.rank_ids), torch.device(self.launch.device),
                           timeout_s=ctl.rank_timeout_s)
        if self.engine is None:
            self.group = group
            self.engine = build_engine(self.launch, msg, group)
            e = self.engine
            self.send(P.RankReady(rank_id=self.id, num_kv_blocks=e.block_manager.num_free_blocks,
                                  block_size=self.launch.config.engine.block_size, max_model_len=e.max_model_len))
        else:
            raise NotImplementedError("changing epochs while serving")
        self.send(P.EpochJoined(rank_id=self.id, epoch=msg.epoch))


def run_rank(launch: P.RankLaunch) -> int:
    """Entry point of a rank process (called by the launcher)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{launch.rank_id} %(levelname)s %(message)s")
    if launch.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(launch.device))
    torch.set_num_threads(max(1, int(os.environ.get("EEP_HPC_RANK_THREADS", "1"))))
    return RankProcess(launch).run()
