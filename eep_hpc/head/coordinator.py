"""The coordinator: the only place that decides. It runs in the head's event loop next to the HTTP API, holds the
head's parts, starts and stops them, and hands each message from a rank to the part that owns what it says.

Protocol with the ranks (messages in protocol.py, the ROUTER socket in link.py, one DEALER per rank):
1. The launcher starts a rank with a RankLaunch (jobs.py); the rank connects and says RankHello.
2. Once the wanted ranks said hello, they get the first Epoch (ordered members, expert placement, the TCPStore to
   build groups from). Each builds its groups and its model share, then says RankReady + EpochJoined.
3. Serving (streams.py): each request goes to one rank (AddRequest), chosen by load; waves wake every member;
   outputs come back as StepOutputs and are fanned out to per-request queues.
4. Scaling (scaling.py, epoch_exchange.py): grow, shrink, rebalance move the group to a new epoch with prepare
   before commit, rolled back on any failure; node notices (notices.py) drain a node; the autoscaler decides alone.
5. Ping every heartbeat (health.py decides whom, the link's beacon thread sends); a rank that stops answering, fails, or whose job dies is marked FAILED. A
   member lost that way starts a recovery (recovery.py): survivors re-form without it and every open request starts
   again on them, so no request fails while one member lives. New requests wait for the recovery to end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Coroutine

from eep_hpc import protocol as P
from eep_hpc.cluster.launcher import Launcher
from eep_hpc.config import Config
from eep_hpc.head.admin import HeadAdmin
from eep_hpc.head.autoscaler import Autoscaler
from eep_hpc.head.epoch_exchange import EpochExchange
from eep_hpc.head.events import describe_event
from eep_hpc.head.expert_load import ExpertLoad
from eep_hpc.head.health import Health
from eep_hpc.head.jobs import RankJobs
from eep_hpc.head.link import RankLink
from eep_hpc.head.membership import Membership, RankState
from eep_hpc.head.metrics import ClusterCollector
from eep_hpc.head.notices import NodeNotices
from eep_hpc.head.recovery import Recovery
from eep_hpc.head.scaling import Scaling
from eep_hpc.head.state import cluster_state
from eep_hpc.head.streams import Streams
from eep_hpc.parallel.eplb import initial_placement
from eep_hpc.serve.output_queue import Sink

log = logging.getLogger("eep_hpc.coordinator")


class Coordinator:
    def __init__(self, cfg: Config, launcher: Launcher, model_dir: str, eos_token_ids: list[int],
                 num_experts: int, num_moe_layers: int, model_name: str = "", max_model_len: int = 0, tokenizer=None,
                 vocab_size: int | None = None):
        """cfg: the config ranks get (read only); what the HTTP front reads (serve.engine_client.EngineClient):
        model_name, max_model_len, tokenizer, vocab_size (the model's: client token ids are checked against it,
        once, before anything reaches a rank)."""
        self.cfg = cfg
        self.model_name, self.max_model_len, self.tokenizer = model_name, max_model_len, tokenizer
        self.vocab_size = vocab_size
        self.num_experts, self.num_moe_layers = num_experts, num_moe_layers
        ctl, par = cfg.control, cfg.parallel
        self._tasks: list[asyncio.Task] = []
        self._stopping = False
        self.membership = m = Membership(f"{ctl.run_dir}/jobs")
        self.link = RankLink(ctl.host, ctl.zmq_port, ctl.store_port, ctl.beacon_port, ctl.heartbeat_s)
        self.streams = Streams(m, self.link, recovery_wait_s=ctl.event_timeout_s * 4)
        self.jobs = RankJobs(launcher, m, self.link, cfg, model_dir, eos_token_ids)
        self.expert_load = ExpertLoad(num_moe_layers, num_experts)
        self.exchange = EpochExchange(m, self.link, self.streams, self.jobs, ctl.event_timeout_s)
        self.scaling = Scaling(m, self.exchange, self.jobs, self.expert_load, num_experts, par.redundant_experts,
                               ctl.event_timeout_s)
        self.health = Health(m, self.link, self.streams, ctl.heartbeat_s, ctl.rank_timeout_s, ctl.head_timeout_s,
                             on_member_lost=lambda: self.recovery.start(), take_back=self.take_back)
        self.recovery = Recovery(m, self.exchange, self.scaling, self.streams, self.health.check_alive,
                                 ctl.heartbeat_s, ctl.rank_timeout_s, self.spawn)
        self.notices = NodeNotices(m, self.link, self.exchange, self.scaling, self.spawn)
        self.autoscaler = Autoscaler(cfg.adapt, m, self.scaling, self.streams, self.ready)
        self.admin = HeadAdmin(m, self.exchange, self.scaling, self.autoscaler, list(cfg.pools), self.spawn)
        self.metrics = ClusterCollector(m, self.exchange)

    def spawn(self, coro: Coroutine) -> asyncio.Task:
        """A task of the head's, cancelled at stop."""
        task = asyncio.create_task(coro)
        self._tasks.append(task)
        return task

    # ---- lifecycle ------------------------------------------------------------------------------------------

    async def start(self, num_ranks: int, timeout_s: float = 300.0) -> None:
        m = self.membership
        self.link.open()
        self.spawn(self.link.receive(self.handle))
        self.spawn(self.health.run())
        self.spawn(self.autoscaler.run())
        if self.cfg.parallel.eplb_period_s > 0:
            self.spawn(self.scaling.rebalance_every(self.cfg.parallel.eplb_period_s, self.ready))
        ids = self.jobs.launch(num_ranks)
        await m.wait_for(lambda: all(m.ranks[i].state == RankState.CONNECTED for i in ids), timeout_s,
                         f"{num_ranks} rank(s) to start")
        placement = initial_placement(self.num_moe_layers, self.num_experts, self.scaling.slots_for(ids))
        self.exchange.form_first(ids, placement)
        await m.wait_for(lambda: all(m.ranks[i].state == RankState.READY for i in ids), timeout_s,
                         "the ranks to load the model")
        log.info("serving on %d rank(s), epoch %d", len(ids), m.epoch)

    def begin_stop(self) -> None:
        """The service is going down: no new scaling (a rank's leave notice then is part of the same shutdown),
        /health says not ready; requests in flight still finish during the API's grace period."""
        self._stopping = True
        self.recovery.close()
        self.notices.close()

    async def stop(self, grace_s: float = 10.0) -> None:
        self.begin_stop()
        self.streams.end_all("abort", "server shutting down")
        await self.jobs.shut_down(grace_s)
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.link.close()

    # ---- what the HTTP front calls (serve.engine_client.EngineClient) ---------------------------------------

    def ready(self) -> bool:
        return not self._stopping and bool(self.membership.ready())

    takes_sink = True  # generate(..., sink=): serve.engine_client.EngineClient

    def generate(self, request_id: str, prompt_token_ids: list[int], sampling: P.SamplingParams,
                 sink: Sink | None = None) -> AsyncIterator[P.RequestOutput]:
        return self.streams.generate(request_id, prompt_token_ids, sampling, sink)

    async def abort(self, request_id: str) -> None:
        await self.streams.abort(request_id)

    def cluster_state(self) -> dict:
        return cluster_state(self.cfg, self.membership, self.streams, self.exchange, self.autoscaler, self.link)

    def take_back(self, rec) -> bool:
        """A rank whose node job started again (requeued): it joins through a grow while the autoscaler wants more
        ranks than serve or are on their way (its minimum), else it is told to leave."""
        m, policy = self.membership, self.autoscaler.policy
        coming = [r for r in m.live() if r.rank_id not in m.members]
        if self._stopping or not policy.enabled or len(m.members) + len(coming) >= policy.min_ranks:
            return False
        self.spawn(self._bring_back(rec.rank_id))
        return True

    async def _bring_back(self, rank_id: int) -> None:
        try:
            log.info("rank %d is back: %s", rank_id, describe_event(await self.scaling.bring_in([rank_id])))
        except Exception as e:  # the grow rolled back and discarded the rank (its job ends); serving goes on
            log.warning("rank %d could not join again: %s", rank_id, e)

    # ---- messages from ranks and node agents ----------------------------------------------------------------

    def handle(self, msg: P.RankToHead) -> None:
        if isinstance(msg, P.NodeLeaving):
            self.notices.take(msg)
            return
        m = self.membership
        rec = m.ranks.get(msg.rank_id)
        if rec is None:
            log.warning("message from unknown rank %d ignored", msg.rank_id)
            return
        if self.health.fence(rec, msg):
            return
        rec.last_seen = time.monotonic()
        match msg:
            case P.StepOutputs(outputs=outputs, stats=stats):
                rec.stats = stats
                self.streams.take(msg.rank_id, outputs)
            case P.Pong(stats=stats):
                rec.stats = stats
                self.expert_load.add(stats.expert_load)
            case P.RankStaged() | P.EpochPrepared() | P.PrepareProgress() | P.EpochLeft():
                self.exchange.take(msg)
            case P.PrepareFailed(epoch=e, error=err):
                log.error("rank %d could not prepare epoch %d: %s", msg.rank_id, e, err)
                self.exchange.take(msg)
            case P.EpochJoined(epoch=e):
                self.exchange.take(msg)
                if e == m.epoch:
                    rec.state = RankState.READY
            case P.WaveDone(wave=w):
                self.streams.wave_done(w)
            case P.RankHello(protocol_version=v):
                if v != P.PROTOCOL_VERSION:
                    log.error("rank %d speaks protocol %d, head %d", msg.rank_id, v, P.PROTOCOL_VERSION)
                    self.health.fail(rec, "protocol version mismatch")
                else:
                    rec.host, rec.pid, rec.device, rec.state = msg.host, msg.pid, msg.device, RankState.CONNECTED
            case P.RankReady(num_kv_blocks=blocks, nixl=nixl):
                rec.num_kv_blocks, rec.nixl = blocks, nixl
            case P.GroupLost(epoch=e, error=err):
                if e == m.epoch:
                    log.warning("rank %d lost the group of epoch %d: %s", msg.rank_id, e, err)
                    self.recovery.start()
            case P.RankFailed(error=err):
                log.error("rank %d failed: %s", msg.rank_id, err)
                self.health.fail(rec, err.splitlines()[0] if err else "rank failed")
        m.changed()

    # ---- scaling, as tests and tools call it ----------------------------------------------------------------

    async def grow(self, n: int = 0, pool: str = "", pools: dict[str, int] | None = None) -> dict:
        return await self.scaling.grow(n, pool, pools)

    async def shrink(self, rank_ids: list[int]) -> dict:
        return await self.scaling.shrink(rank_ids)

    async def rebalance_experts(self) -> dict:
        return await self.scaling.rebalance()

    # ---- read-only views of the parts' state (tests read these) ---------------------------------------------

    @property
    def ranks(self):
        return self.membership.ranks

    @property
    def members(self) -> list[int]:
        return self.membership.members

    @property
    def epoch(self) -> int:
        return self.membership.epoch

    @property
    def wave(self) -> int:
        return self.streams.wave

    @property
    def event(self):
        return self.exchange.event

    @property
    def history(self):
        return self.exchange.history

    @property
    def address(self) -> str:
        return self.link.address

    @property
    def store(self):
        return self.link.store
