"""The cluster's state as JSON (GET /admin/state, `eep-hpc status`): ranks, epoch, expert placement, adaptive
scaling, the event in progress and the last ones. Read at request time from the parts that own each piece.

`ranks` lists the live ranks only, like squeue its unfinished jobs: a rank that failed or exited leaves the list
(its last figures would be stale); the recover or shrink event in `scale_events` names it."""

from __future__ import annotations

from eep_hpc.config import Config
from eep_hpc.head.autoscaler import Autoscaler
from eep_hpc.head.epoch_exchange import EpochExchange
from eep_hpc.head.link import RankLink
from eep_hpc.head.membership import GONE, Membership, RankRecord, RankState, is_pending
from eep_hpc.head.streams import Streams


def rank_state(rec: RankRecord, members: list[int], slot_offsets: list[int] | None) -> dict:
    s = rec.stats
    position = members.index(rec.rank_id) if rec.rank_id in members else None
    return {
        "rank_id": rec.rank_id,
        "epoch_rank": position,
        "expert_slots": (slot_offsets[position + 1] - slot_offsets[position]  # per MoE layer
                         if position is not None and slot_offsets else 0),
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
            "ranks": [rank_state(rec, m.members, m.placement.slot_offsets if m.placement else None)
                      for rec in m.ranks.values() if rec.state not in GONE],
            "requests_in_flight": len(streams.open), "placement": placement,
            "scaling": exchange.event.summary() if exchange.event else None,
            "scale_events": [e.summary() for e in exchange.history[-20:]]}
