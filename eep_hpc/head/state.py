"""The cluster's state as JSON (GET /admin/state, `eep-hpc status`): ranks, epoch, expert placement, adaptive
scaling, the event in progress and the last ones. Read at request time from the parts that own each piece."""

from __future__ import annotations

from eep_hpc.config import Config
from eep_hpc.head.autoscaler import Autoscaler
from eep_hpc.head.epoch_exchange import EpochExchange
from eep_hpc.head.link import RankLink
from eep_hpc.head.membership import Membership, RankRecord, RankState, is_pending
from eep_hpc.head.streams import Streams


def rank_state(rec: RankRecord, members: list[int]) -> dict:
    s = rec.stats
    return {
        "rank_id": rec.rank_id,
        "epoch_rank": members.index(rec.rank_id) if rec.rank_id in members else None,
        "state": "PENDING" if rec.state == RankState.LAUNCHED and is_pending(rec.job) else rec.state.name,
        "host": rec.host, "pid": rec.pid, "device": rec.device, "job_id": rec.job.job_id,
        "requests_in_flight": len(rec.in_flight),
        "num_running": s.num_running, "num_waiting": s.num_waiting, "steps": s.steps,
        "graph_steps": s.graph_steps, "host_collectives": s.host_collectives,
        "kv_blocks_used": s.kv_blocks_used, "kv_blocks_total": s.kv_blocks_total,
        "prefix_cache_queries": s.prefix_cache_queries, "prefix_cache_hits": s.prefix_cache_hits,
    }


def cluster_state(cfg: Config, membership: Membership, streams: Streams, exchange: EpochExchange,
                  autoscaler: Autoscaler, link: RankLink) -> dict:
    m = membership
    placement = None
    if m.placement is not None:
        placement = {"slot_offsets": list(m.placement.slot_offsets),
                     "physical_to_logical": m.placement.physical_to_logical.tolist()}
    return {"adapt": autoscaler.state(),
            "dtype": cfg.model.dtype, "quantization": cfg.model.quantization, "backend": cfg.parallel.backend,
            "epoch": m.epoch, "members": m.members, "wave": streams.wave, "wave_running": streams.wave_running,
            "control_messages_dropped": link.dropped,
            "ranks": [rank_state(rec, m.members) for rec in m.ranks.values() if rec.state != RankState.EXITED],
            "requests_in_flight": len(streams.open), "placement": placement,
            "scaling": exchange.event.summary() if exchange.event else None,
            "scale_events": [e.summary() for e in exchange.history[-20:]]}
