"""The rank process: a thin wrapper that feeds a RankEngine from the head's ZMQ socket and steps it in waves.

Loop: idle ranks block on their socket (no spinning). A Wake for the current wave makes a rank active; active ranks
run one agreement per iteration (parallel/step_plan.py: what each is about to run, and which scaling action every
member holds) and then all do the same thing: a prepare, a commit, one model step of the agreed shape, or leave
the wave (nobody has work; epoch rank 0 reports WaveDone). The epoch side (membership, prepare, commit) is
epochs.py. A rank that hears nothing from the head for `head_timeout_s` exits: the head is gone. The head's Pings
come on a socket of their own (`pings`, from the head's beacon thread, head/beacon.py), polled next to the main one.
"""

from __future__ import annotations

import dataclasses
import faulthandler
import logging
import os
import signal
import socket
import time
import traceback
from pathlib import Path

import torch
import zmq

from eep_hpc import protocol as P
from eep_hpc import signing
from eep_hpc.gc_heap import warn_on_long_pauses
from eep_hpc.logs import setup_logging
from eep_hpc.parallel import step_plan
from eep_hpc.parallel.groups import GroupLost
from eep_hpc.rank.beacon import Beacon
from eep_hpc.rank.epochs import RankEpochs
from eep_hpc.rank.step_trace import StepTrace

log = logging.getLogger("eep_hpc.rank")

IDLE_POLL_S = 0.002  # a wave with nothing to run (waiting for reads or a peer's message) polls at this pace


class RankProcess:
    def __init__(self, launch: P.RankLaunch):
        self.launch = launch
        self.id = launch.rank_id
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, signing.rank_identity(self.id))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(launch.head_address)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.pings = None
        if launch.head_beacon_address:
            self.pings = self.ctx.socket(zmq.DEALER)
            self.pings.setsockopt(zmq.IDENTITY, signing.rank_identity(self.id))
            self.pings.setsockopt(zmq.LINGER, 0)
            self.pings.connect(launch.head_beacon_address)
            self.poller.register(self.pings, zmq.POLLIN)
        # one PUSH per API process of the head (serve.api_servers > 1): the outputs of the requests it streams
        self.api_socks = []
        for address in launch.api_addresses:
            sock = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.connect(address)
            self.api_socks.append(sock)
        self.reply_to: dict[str, int] = {}  # request id -> API process, for those not streamed by the head itself
        self.epochs = RankEpochs(launch, self.send)
        self.wave = 0
        self.active = False
        self.stopping = False
        self.last_heard = time.monotonic()
        self.notice: str = ""  # set by a termination signal: ask the head to drain this rank, once
        self.trace = StepTrace(launch.config.engine.step_trace, self.id)
        self.beacon = Beacon(self.ctx, launch.head_address, self.id, launch.config.control.heartbeat_s)

    @property
    def engine(self):
        return self.epochs.engine

    def send(self, msg) -> None:
        self.sock.send(signing.encode(msg), copy=False)

    def run(self) -> int:
        ctl = self.launch.config.control
        self.send(P.RankHello(protocol_version=P.PROTOCOL_VERSION, rank_id=self.id, pid=os.getpid(),
                              host=socket.gethostname(), device=self.launch.device))
        self.beacon.start()
        try:
            while not self.stopping:
                self.drain(timeout_ms=0 if self.active else int(ctl.heartbeat_s * 1000))
                self.epochs.settle_dropped()
                # judged right after draining: a long prepare must not count the pings queued meanwhile as missing;
                # nor a long message handled in that drain (the first Epoch: model load, warm-up, graph capture)
                if time.monotonic() - self.last_heard > ctl.head_timeout_s:
                    self.drain(timeout_ms=0)
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
            if self.epochs.group is not None:
                self.epochs.group.destroy()
            self.beacon.stop()
            for sock in [self.sock, *self.api_socks, *([self.pings] if self.pings else [])]:
                sock.close(linger=0)
            self.ctx.term()
            self.trace.close()

    def drain(self, timeout_ms: int) -> None:
        """Handle every queued message; wait up to timeout_ms for the first one."""
        ready = dict(self.poller.poll(timeout_ms))
        if not ready:
            return
        if self.pings in ready:  # the head's beacon sends Pings only; anything else on its socket is dropped
            self._drain(self.pings, self.launch.head_beacon_address, only=P.Ping)
        self._drain(self.sock, self.launch.head_address)

    def _drain(self, sock, address: str, only: type | None = None) -> None:
        while not self.stopping:
            try:
                data = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = signing.decode_for_rank(data)
                if only is not None and not isinstance(msg, only):
                    raise signing.BadMessage(f"{type(msg).__name__} on a socket that carries {only.__name__} only")
            except signing.BadMessage as e:  # not from this run's head: dropped, and not counted as hearing from it
                signing.log_dropped(log, address, e)
                continue
            self.last_heard = time.monotonic()
            self.handle(msg)

    def handle(self, msg) -> None:
        epochs = self.epochs
        match msg:
            case P.AddRequest():  # token ids were checked by the head's API (serve/prompts.py)
                if msg.reply_to:
                    self.reply_to[msg.request_id] = msg.reply_to
                self.engine.add(msg)
                if self.trace:
                    self.trace.write(event="add", request_id=msg.request_id, tokens=len(msg.prompt_token_ids))
            case P.AbortRequests(request_ids=ids):
                self.engine.abort(ids)
                for rid in ids:
                    self.reply_to.pop(rid, None)
            case P.Wake(wave=w):
                if w >= self.wave and epochs.group is not None:
                    self.wave, self.active = w, True
            case P.Ping(sent_at=t):
                stats = self.stats(with_load=True) if self.engine else P.RankStats()
                self.send(P.Pong(rank_id=self.id, sent_at=t, stats=stats))
            case P.Epoch():
                epochs.on_epoch(msg)
                warn_on_long_pauses(f"rank {self.id}")
            case P.PrepareEpoch():
                if epochs.on_prepare(msg):
                    self.active = True
                elif epochs.group is None:  # a recovery dropped the group: no wave until the commit
                    self.active = False
            case P.CommitEpoch():
                if epochs.on_commit(msg):
                    self.active = True
                elif epochs.commit_epoch:
                    self.commit()
            case P.AbortEpoch(epoch=e):
                epochs.on_abort(e)
                self.stopping = self.stopping or epochs.left
            case P.Shutdown():
                self.stopping = True

    def stats(self, with_load: bool = False) -> P.RankStats:
        stats = self.engine.stats(with_load)
        stats.host_collectives = self.epochs.host_collectives
        return stats

    def step_wave(self) -> None:
        """One iteration of the wave: one agreement on what every member runs, then all run it."""
        epochs, engine = self.epochs, self.engine
        t0 = time.perf_counter()
        epochs.poll(wait=False)  # experts read in the background: once in, the prepare waits for the boundary
        demand = engine.demand()
        if epochs.fetching:  # the wave goes on until every member has its experts and prepares
            demand = dataclasses.replace(demand, busy=True)
        plan = step_plan.agree(epochs.group, demand, engine.graph_sizes(), engine.chunk_tokens,
                               epochs.prepare_epoch, epochs.commit_epoch)
        if plan.prepare_epoch:
            epochs.prepare()
            return
        if plan.commit_epoch:
            self.commit()
            return
        if not plan.busy:
            self.active = False
            if epochs.epoch_rank == 0:
                self.send(P.WaveDone(rank_id=self.id, wave=self.wave))
            self.wave += 1
            return
        if not plan.max_tokens:  # busy (reads under way, a scaling message not yet everywhere) with nothing to run
            outputs = engine.skip_step()
            if outputs:  # requests refused without running
                self.send_outputs(outputs)
            else:
                time.sleep(IDLE_POLL_S)
            return
        t1 = time.perf_counter()
        with self.trace.profiled(demand.tokens > 0):
            outputs = engine.step(plan)
        if self.trace:
            self.trace.write(event="step", wave=self.wave, agree_ms=round((t1 - t0) * 1e3, 3),
                             step_ms=round((time.perf_counter() - t1) * 1e3, 3), graph=plan.graph_size, mixed=plan.mixed,
                             capture=plan.capture, chunks=plan.chunks, tokens=demand.tokens, seqs=demand.seqs,
                             max_tokens=plan.max_tokens, running=engine.scheduler.num_running,
                             waiting=engine.scheduler.num_waiting, outputs=len(outputs))
        masked = getattr(getattr(engine.ep, "all_to_all", None), "failed_ranks", None)
        if masked is not None and masked():  # nixl_ep timed a peer out and masked it: this epoch is broken
            raise GroupLost(f"nixl_ep masked rank(s) {masked()}")
        if outputs:
            self.send_outputs(outputs)

    def send_outputs(self, outputs: list[P.RequestOutput]) -> None:
        """Each output to the API process that streams its request; the head hears of the others only when they
        finish (a bare finish_reason), which frees them in its routing."""
        if not self.reply_to:
            self.send(P.StepOutputs(rank_id=self.id, outputs=outputs, stats=self.stats()))
            return
        to_head, to_api = [], {}
        for out in outputs:
            api = self.reply_to.get(out.request_id, 0)
            if not api:
                to_head.append(out)
                continue
            to_api.setdefault(api, []).append(out)
            if out.finish_reason is not None:
                del self.reply_to[out.request_id]
                to_head.append(P.RequestOutput(request_id=out.request_id, new_token_ids=[],
                                               finish_reason=out.finish_reason))
        stats = self.stats()
        for api, outs in to_api.items():
            try:
                self.api_socks[api - 1].send(signing.encode(P.StepOutputs(rank_id=self.id, outputs=outs, stats=stats)),
                                             zmq.NOBLOCK, copy=False)
            except zmq.Again:  # that API process is gone or stuck: its streams end there, not this rank
                log.warning("rank %d: API process %d does not take outputs, %d dropped", self.id, api, len(outs))
        if to_head:
            self.send(P.StepOutputs(rank_id=self.id, outputs=to_head, stats=stats))

    def commit(self) -> None:
        wave = self.epochs.commit()
        if wave is None:
            self.active = False
        else:
            self.wave, self.active = wave, True
            # A long collection in one rank stalls every member's step: say so when one happens. The start-up heap
            # is not frozen here as in the head (gc_heap.py): it holds the first epoch's communication state, which
            # a later epoch replaces, and frozen objects in a reference cycle would never be freed.
            warn_on_long_pauses(f"rank {self.id}")

    def lose_group(self, why: str) -> None:
        self.epochs.lose_group(why)
        self.active = False


def run_rank(launch: P.RankLaunch) -> int:
    """Entry point of a rank process (called by the launcher)."""
    setup_logging(f"%(asctime)s rank{launch.rank_id} %(levelname)s %(message)s")
    faulthandler.register(signal.SIGQUIT, all_threads=True)  # `kill -QUIT <pid>` prints where a rank is stuck
    if launch.device.startswith("cuda"):
        # a collective stuck on a dead peer times out by aborting its communicator, not by killing this process
        # (torch's default): the survivor then reports GroupLost and takes part in the recovery
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        torch.cuda.set_device(torch.device(launch.device))
    # one Triton cache for the run's ranks on every node (the run dir is shared; Triton reads this when it compiles):
    # a rank that joins finds the kernels the first ranks compiled, instead of compiling them inside its first
    # exchanges while its peers wait (past control.rank_timeout_s they would declare it lost)
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(launch.config.control.run_dir) / "triton-cache"))
    log.info("rank %d: Triton's kernel cache: %s", launch.rank_id, os.environ["TRITON_CACHE_DIR"])
    torch.set_num_threads(max(1, int(os.environ.get("EEP_HPC_RANK_THREADS", "1"))))
    signing.use_secret(signing.read_secret(launch.config.control.secret_file))  # before the socket: its identity derives from it
    rank = RankProcess(launch)

    def on_term(signum, frame):  # scancel / preemption / a user's kill: leave in order, not abruptly
        rank.notice = signal.Signals(signum).name

    if not os.environ.get("EEP_HPC_NODE_AGENT"):  # under a node agent, the agent reports the node's notice
        signal.signal(signal.SIGTERM, on_term)
    return rank.run()
