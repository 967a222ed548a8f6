"""The coordinator: the only place that decides. It runs in the head's event loop next to the HTTP API.

Protocol with the ranks (messages in protocol.py, one ROUTER socket here, one DEALER per rank):
1. The launcher starts a rank with a RankLaunch; the rank connects and says RankHello.
2. Once the wanted ranks said hello, the coordinator sends them an Epoch (ordered members, expert placement, the
   TCPStore to build groups from). Each builds its groups and its model share, then says RankReady + EpochJoined.
3. Serving: each request goes to one rank (AddRequest), chosen by load (requests in flight, KV use). A request
   that arrives while the ranks are idle starts a wave (Wake to every member, since each MoE layer needs all of
   them); rank 0 reports WaveDone when all ran out of work, and a new wave starts if requests are still out.
   Outputs come back as StepOutputs and are fanned out to per-request queues.
4. Ping every heartbeat; a rank that stops answering, fails, or whose job dies is marked FAILED. A member lost
   that way starts a recovery (scaling.recover): survivors re-form without it and every open request starts
   again on them, so no request fails while one member lives. New requests wait for the recovery to end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import torch.distributed as dist
import zmq
import zmq.asyncio

from eep_hpc import protocol as P
from eep_hpc.cluster.launcher import Launcher
from eep_hpc.config import Config
from eep_hpc.head.autoscaler import Autoscaler
from eep_hpc.head.membership import RankRecord, RankState, StartupError, is_pending, slots_per_rank
from eep_hpc.head.scaling import ScalingMixin
from eep_hpc.head.events import ScaleBusy, ScaleEvent, ScaleFailed, ScalePhase
from eep_hpc.parallel.eplb import Placement, initial_placement

log = logging.getLogger("eep_hpc.coordinator")

RECOVERY_ATTEMPTS = 5  # re-forming after a loss gives up (and fails the open requests) after this many tries


@dataclass
class Stream:
    queue: asyncio.Queue
    rank_id: int
    prompt_token_ids: list[int]
    sampling: P.SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    last_token_at: float = field(default_factory=time.monotonic)
    watch_gap: bool = False  # measure its next inter-token gap (around a commit)


class Coordinator(ScalingMixin):
    def __init__(self, cfg: Config, launcher: Launcher, model_dir: str, eos_token_ids: list[int],
                 num_experts: int, num_moe_layers: int, model_name: str = "", max_model_len: int = 0, tokenizer=None):
        self.cfg, self.launcher = cfg, launcher
        # what the HTTP front reads (serve.engine_client.EngineClient)
        self.model_name, self.max_model_len, self.tokenizer = model_name, max_model_len, tokenizer
        self.model_dir, self.eos_token_ids = model_dir, eos_token_ids
        self.num_experts, self.num_moe_layers = num_experts, num_moe_layers
        self.ranks: dict[int, RankRecord] = {}
        self.members: list[int] = []  # rank ids of the current epoch, in epoch-rank order
        self.epoch = -1  # the epoch serving now
        self.last_epoch_number = -1  # the highest epoch number handed out (prepared ones included)
        self.placement: Placement | None = None
        self.streams: dict[str, Stream] = {}
        self.wave = 0
        self.wave_running = False
        self.next_rank_id = 0
        self.address = ""
        self._tasks: list[asyncio.Task] = []
        self._changed = asyncio.Event()  # any rank state change, for waiters
        self._stopping = False
        self.event: ScaleEvent | None = None  # the scaling event in progress
        self.history: list[ScaleEvent] = []
        self.expert_load = None  # [L, E] tokens per logical expert since the last rebalance
        self._acks: dict[tuple[str, int], set[int]] = {}  # (message kind, epoch) -> rank ids that sent it
        self._leaving: list[P.NodeLeaving] = []  # scheduler notices received, for status
        self._recovery: asyncio.Task | None = None  # re-forming the group after members were lost

    # ---- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, num_ranks: int, timeout_s: float = 300.0) -> None:
        ctl = self.cfg.control
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if ctl.zmq_port:
            self.sock.bind(f"tcp://{ctl.host}:{ctl.zmq_port}")
        else:
            self.sock.bind_to_random_port(f"tcp://{ctl.host}")
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.store = dist.TCPStore(ctl.host, ctl.store_port, is_master=True, wait_for_workers=False)
        self._tasks = [asyncio.create_task(self._recv_loop()), asyncio.create_task(self._heartbeat_loop())]
        self.autoscaler = Autoscaler(self, self.cfg.adapt)
        self._tasks.append(asyncio.create_task(self.autoscaler.run()))
        if self.cfg.parallel.eplb_period_s > 0:
            self._tasks.append(asyncio.create_task(self._rebalance_loop(self.cfg.parallel.eplb_period_s)))
        ids = self.launch(num_ranks)
        await self._wait_for(lambda: all(self.ranks[i].state == RankState.CONNECTED for i in ids), timeout_s,
                             f"{num_ranks} rank(s) to start")
        self.form_epoch(ids, initial_placement(self.num_moe_layers, self.num_experts,
                                               slots_per_rank(self.num_experts, self.cfg.parallel.redundant_experts,
                                                              [self.ranks[i].capacity for i in ids])))
        await self._wait_for(lambda: all(self.ranks[i].state == RankState.READY for i in ids), timeout_s,
                             "the ranks to load the model")
        log.info("serving on %d rank(s), epoch %d", len(ids), self.epoch)

    def begin_stop(self) -> None:
        """The service is going down: no new scaling (a rank's leave notice then is part of the same shutdown),
        /health says not ready; requests in flight still finish during the API's grace period."""
        self._stopping = True

    async def stop(self, grace_s: float = 10.0) -> None:
        self._stopping = True
        for stream in self.streams.values():
            stream.queue.put_nowait(P.RequestOutput(request_id="", new_token_ids=[], finish_reason="abort",
                                                    error="server shutting down"))
        for rec in self.ranks.values():
            if rec.state not in (RankState.FAILED, RankState.EXITED):
                self.send(rec.rank_id, P.Shutdown())
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(r.job.alive() for r in self.ranks.values()):
            await asyncio.sleep(0.1)
        for rec in self.ranks.values():
            if rec.job.alive():
                log.warning("rank %d did not exit in %.0f s, killing it", rec.rank_id, grace_s)
                rec.job.kill()
            rec.state = RankState.EXITED
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.sock.close(linger=0)
        self.ctx.term()
        del self.store

    def launch(self, n: int, pool: str = "", pools: dict[str, int] | None = None) -> list[int]:
        """Submit ranks: n of one pool, or {pool: count} as one heterogeneous submission."""
        def make(count):
            out = []
            for _ in range(count):
                rid = self.next_rank_id
                self.next_rank_id += 1
                out.append(P.RankLaunch(rank_id=rid, head_address=self.address, model_dir=self.model_dir,
                                        eos_token_ids=self.eos_token_ids, device=self.launcher.device_for(rid),
                                        config=self.cfg))
            return out

        if pools:
            groups = {name: make(count) for name, count in pools.items()}
            launches = [launch for group in groups.values() for launch in group]
            pool_of = {launch.rank_id: name for name, group in groups.items() for launch in group}
            jobs = self.launcher.launch_pools(groups)
        else:
            launches = make(n)
            pool = pool or self.cfg.parallel.pool
            pool_of = {launch.rank_id: pool for launch in launches}
            jobs = self.launcher.launch(launches, pool=pool) if pool else self.launcher.launch(launches)
        for launch, job in zip(launches, jobs):
            shape = self.cfg.pools.get(pool_of[launch.rank_id])
            self.ranks[launch.rank_id] = RankRecord(launch.rank_id, job, capacity=shape.expert_capacity if shape else 1.0)
        return [launch.rank_id for launch in launches]

    def form_epoch(self, rank_ids: list[int], placement: Placement) -> None:
        self.epoch = self.last_epoch_number = self.last_epoch_number + 1
        self.members, self.placement = list(rank_ids), placement
        msg = P.Epoch(epoch=self.epoch, rank_ids=self.members, store_host=self.cfg.control.host,
                      store_port=self.store.port, physical_to_logical=placement.physical_to_logical.tolist(),
                      slot_offsets=list(placement.slot_offsets))
        for rid in self.members:
            self.send(rid, msg)

    async def _wait_for(self, cond, timeout_s: float, what: str, watch: list[int] | None = None,
                        raise_on_failed: bool = True) -> None:
        deadline = time.monotonic() + timeout_s
        while not cond():
            watched = self.ranks.values() if watch is None else [self.ranks[r] for r in watch]
            failed = [r.rank_id for r in watched if r.state == RankState.FAILED]
            if failed and raise_on_failed:
                raise StartupError(f"rank(s) {failed} failed while waiting for {what}; see {self.cfg.control.run_dir}/jobs")
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartupError(f"timed out after {timeout_s:.0f} s waiting for {what}")
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 1.0))
            except asyncio.TimeoutError:
                pass

    # ---- engine client --------------------------------------------------------------------------------------

    def ready(self) -> bool:
        return not self._stopping and any(self.ranks[r].state == RankState.READY for r in self.members)

    def route(self) -> RankRecord:
        ready = [self.ranks[r] for r in self.members if self.ranks[r].state == RankState.READY]
        if not ready:
            raise RuntimeError("no rank is ready to serve")

        def load(rec: RankRecord):
            total = rec.stats.kv_blocks_total or 1
            return (len(rec.in_flight), rec.stats.kv_blocks_used / total, rec.rank_id)

        return min(ready, key=load)

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: P.SamplingParams) -> AsyncIterator[P.RequestOutput]:
        if self._recovery is not None:  # members were lost: the survivors are re-forming, then take it
            await self._wait_for(lambda: self._recovery is None, self.cfg.control.rank_timeout_s * 4,
                                 "the serving group to recover", raise_on_failed=False)
        rec = self.route()
        stream = Stream(asyncio.Queue(), rec.rank_id, prompt_token_ids, sampling)
        self.streams[request_id] = stream
        rec.in_flight.add(request_id)
        self.send(rec.rank_id, P.AddRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling))
        self._start_wave()
        finished = False
        try:
            while True:
                out = await stream.queue.get()
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self.streams.pop(request_id, None)
            owner = self.ranks.get(stream.rank_id)
            if owner is not None:
                owner.in_flight.discard(request_id)
                if not finished and owner.state in (RankState.READY, RankState.DRAINING):
                    self.send(owner.rank_id, P.AbortRequests(request_ids=[request_id]))

    async def abort(self, request_id: str) -> None:
        stream = self.streams.get(request_id)
        if stream is not None:
            self.send(stream.rank_id, P.AbortRequests(request_ids=[request_id]))
            stream.queue.put_nowait(P.RequestOutput(request_id=request_id, new_token_ids=[], finish_reason="abort"))

    def _start_wave(self) -> None:
        if self.wave_running:
            return
        self.wave_running = True
        for rid in self.members:
            self.send(rid, P.Wake(wave=self.wave))

    # ---- messages -------------------------------------------------------------------------------------------

    def send(self, rank_id: int, msg) -> None:
        """Never waits. Sends go through the asyncio socket itself: ZMQ's readiness signal is edge-triggered, and
        an operation behind the event loop's back (e.g. on a shadow socket) can swallow the edge the pending
        receive is waiting for."""
        fut = self.sock.send_multipart([P.rank_identity(rank_id), P.encode(msg)], flags=zmq.NOBLOCK)
        name = type(msg).__name__

        def check(f):
            if not f.cancelled() and f.exception() is not None:  # not connected (yet, or any more)
                log.debug("cannot send %s to rank %d: %s", name, rank_id, f.exception())

        fut.add_done_callback(check)

    async def _recv_loop(self) -> None:
        while True:
            sender, *frames = await self.sock.recv_multipart()
            try:
                if len(frames) != 1:  # anyone can connect: no frame layout may end this loop
                    raise P.BadMessage(f"{len(frames)} frames, not 1")
                self.handle(P.decode_for_head(frames[0]))
            except P.BadMessage as e:
                P.log_dropped(log, sender[:64], e)
            except Exception:
                log.exception("bad message from a rank")

    def handle(self, msg) -> None:
        if isinstance(msg, P.NodeLeaving):
            self._leaving.append(msg)
            self._tasks.append(asyncio.create_task(self._release(msg)))
            return
        rec = self.ranks.get(msg.rank_id)
        if rec is None:
            log.warning("message from unknown rank %d ignored", msg.rank_id)
            return
        rec.last_seen = time.monotonic()
        match msg:
            case P.StepOutputs(outputs=outputs, stats=stats):
                rec.stats = stats
                now = time.monotonic()
                for out in outputs:
                    stream = self.streams.get(out.request_id)
                    if stream is None or stream.rank_id != msg.rank_id:  # finished, or moved to another rank
                        continue
                    if out.new_token_ids:
                        self._note_token(stream, now)
                        stream.output_token_ids += out.new_token_ids
                    stream.queue.put_nowait(out)
            case P.Pong(stats=stats):
                rec.stats = stats
                self._add_load(stats.expert_load)
            case P.RankStaged(epoch=e) | P.EpochPrepared(epoch=e) | P.EpochLeft(epoch=e):
                self._acks.setdefault((type(msg).__name__, e), set()).add(msg.rank_id)
                if self.event is not None and self.event.epoch == e:
                    if isinstance(msg, P.EpochPrepared):
                        self.event.bytes_moved += msg.bytes_received
                    elif isinstance(msg, P.RankStaged):
                        rec.nixl = msg.nixl
                        self.event.bytes_moved += msg.dense_bytes
                        self.event.dense_bytes += msg.dense_bytes
                        self.event.dense_source = ",".join(filter(None, [self.event.dense_source, msg.dense_source]))
            case P.PrepareFailed(epoch=e, error=err):
                log.error("rank %d could not prepare epoch %d: %s", msg.rank_id, e, err)
                self._acks.setdefault(("PrepareFailed", e), set()).add(msg.rank_id)
            case P.WaveDone(wave=w):
                if w == self.wave:
                    self.wave, self.wave_running = w + 1, False
                    if self.streams:
                        self._start_wave()
            case P.RankHello(protocol_version=v):
                if v != P.PROTOCOL_VERSION:
                    log.error("rank %d speaks protocol %d, head %d", msg.rank_id, v, P.PROTOCOL_VERSION)
                    self._fail(rec, "protocol version mismatch")
                else:
                    rec.host, rec.pid, rec.device, rec.state = msg.host, msg.pid, msg.device, RankState.CONNECTED
            case P.RankReady(num_kv_blocks=blocks, nixl=nixl):
                rec.num_kv_blocks, rec.nixl = blocks, nixl
            case P.EpochJoined(epoch=e):
                self._acks.setdefault(("EpochJoined", e), set()).add(msg.rank_id)
                if e == self.epoch:
                    rec.state = RankState.READY
            case P.GroupLost(epoch=e, error=err):
                if e == self.epoch:
                    log.warning("rank %d lost the group of epoch %d: %s", msg.rank_id, e, err)
                    self._start_recovery()
            case P.RankFailed(error=err):
                log.error("rank %d failed: %s", msg.rank_id, err)
                self._fail(rec, err.splitlines()[0] if err else "rank failed")
        self._changed.set()

    def _note_token(self, stream: Stream, now: float) -> None:
        if stream.watch_gap and self.event is not None:
            gap_ms = (now - stream.last_token_at) * 1000
            self.event.commit_pause_ms = max(self.event.commit_pause_ms, gap_ms)
            if self.event.phase != ScalePhase.COMMITTING:
                stream.watch_gap = False
        stream.last_token_at = now

    def _add_load(self, load: list[list[int]]) -> None:
        if not load:
            return
        import torch

        t = torch.tensor(load, dtype=torch.float64)
        self.expert_load = t if self.expert_load is None else self.expert_load + t

    def _fail(self, rec: RankRecord, why: str) -> None:
        rec.state = RankState.FAILED
        rec.job.kill()  # a rank declared dead must not come back half-alive
        if rec.rank_id in self.members and not self._stopping:
            log.error("member rank %d lost: %s", rec.rank_id, why)
            self._start_recovery()  # its requests start again on the survivors
            self._changed.set()
            return
        for rid in list(rec.in_flight):
            stream = self.streams.get(rid)
            if stream is not None:
                stream.queue.put_nowait(P.RequestOutput(request_id=rid, new_token_ids=[], finish_reason="error",
                                                        error=f"rank {rec.rank_id} failed: {why}"))
        rec.in_flight.clear()
        self._changed.set()

    def _start_recovery(self) -> None:
        if self._recovery is None and not self._stopping:
            self._recovery = asyncio.create_task(self._recover_loop())
            self._tasks.append(self._recovery)

    async def _recover_loop(self) -> None:
        """Until the survivors serve in a new epoch: let a scaling event in progress fail on the lost rank and
        roll back, check which members are alive, re-form. Open requests wait meanwhile; they fail only when no
        member is left."""
        attempts = 0
        try:
            while not self._stopping:
                while self.event is not None:
                    await asyncio.sleep(0.05)
                # a peer's broken connection is often heard of before its exit: give the launcher a moment to
                # see which member died, rather than re-forming with it
                deadline = time.monotonic() + 2 * self.cfg.control.heartbeat_s
                await self._check_alive()
                while not self._lost_members() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                    await self._check_alive()
                try:
                    await self.recover()
                    return
                except ScaleBusy:
                    continue
                except Exception as e:  # ScaleFailed, or anything else: it must not leave requests waiting
                    attempts += 1
                    alive = any(self.ranks[r].state == RankState.READY for r in self.members)
                    if not alive or attempts >= RECOVERY_ATTEMPTS:
                        log.error("cannot recover (attempt %d): %s", attempts, e)
                        for stream in self.streams.values():
                            stream.queue.put_nowait(P.RequestOutput(request_id="", new_token_ids=[], finish_reason="error",
                                                                    error=f"the serving group could not recover: {e}"))
                        return
                    log.error("recovery attempt %d failed, retrying: %s", attempts, e)
                await asyncio.sleep(0.5 * attempts)
        finally:
            self._recovery = None
            self._changed.set()

    def _lost_members(self) -> list[int]:
        return [r for r in self.members if self.ranks[r].state in (RankState.FAILED, RankState.EXITED)]

    async def _check_alive(self) -> None:
        """Ask the launcher about every live rank (alive() may ask the scheduler, so off the event loop): a dead
        process is FAILED."""
        live = [rec for rec in self.ranks.values() if rec.state not in (RankState.FAILED, RankState.EXITED)]
        alive = await asyncio.to_thread(lambda: {rec.rank_id: rec.job.alive() for rec in live})
        for rec in live:
            if not alive[rec.rank_id] and rec.state not in (RankState.FAILED, RankState.EXITED):
                self._fail(rec, "its process exited")

    async def _heartbeat_loop(self) -> None:
        ctl = self.cfg.control
        while True:
            await asyncio.sleep(ctl.heartbeat_s)
            await self._check_alive()
            now = time.monotonic()
            for rec in list(self.ranks.values()):
                if rec.state in (RankState.LAUNCHED, RankState.FAILED, RankState.EXITED):
                    continue
                if now - rec.last_seen > ctl.rank_timeout_s:
                    self._fail(rec, f"no message for {ctl.rank_timeout_s:.0f} s")
                else:
                    self.send(rec.rank_id, P.Ping(sent_at=time.time()))

    # ---- state for status / admin ---------------------------------------------------------------------------

    def cluster_state(self) -> dict:
        ranks = []
        for rec in self.ranks.values():
            if rec.state == RankState.EXITED:
                continue
            s = rec.stats
            ranks.append({
                "rank_id": rec.rank_id,
                "epoch_rank": self.members.index(rec.rank_id) if rec.rank_id in self.members else None,
                "state": "PENDING" if rec.state == RankState.LAUNCHED and is_pending(rec.job) else rec.state.name,
                "host": rec.host, "pid": rec.pid, "device": rec.device, "job_id": rec.job.job_id,
                "requests_in_flight": len(rec.in_flight),
                "num_running": s.num_running, "num_waiting": s.num_waiting, "steps": s.steps,
                "graph_steps": s.graph_steps,
                "kv_blocks_used": s.kv_blocks_used, "kv_blocks_total": s.kv_blocks_total,
                "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
            })
        placement = None
        if self.placement is not None:
            placement = {"slot_offsets": list(self.placement.slot_offsets),
                         "physical_to_logical": self.placement.physical_to_logical.tolist()}
        adapt = self.cfg.adapt
        return {"adapt": {"enabled": adapt.enabled, "min_ranks": adapt.min_ranks, "max_ranks": adapt.max_ranks,
                          "last": self.autoscaler.last.why if hasattr(self, "autoscaler") else ""},
                "dtype": self.cfg.model.dtype, "quantization": self.cfg.model.quantization,
                "backend": self.cfg.parallel.backend,
                "epoch": self.epoch, "members": self.members, "wave": self.wave, "ranks": ranks,
                "requests_in_flight": len(self.streams), "placement": placement,
                "scaling": self.event.summary() if self.event else None,
                "scale_events": [e.summary() for e in self.history[-20:]]}
