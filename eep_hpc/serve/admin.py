"""Admin routes of the head: scale the serving group and re-place experts (bearer admin token when configured).

POST /admin/scale/grow      {"n": 2}                              start n ranks and bring them in
POST /admin/scale/shrink    {"n": 1} | {"rank_ids": [3]} | {"node": "host"}   drain and remove ranks
POST /admin/rebalance       {}                                   re-place experts by the load counted so far
POST /admin/adapt           {"min": 1, "max": 4}                 grow under load, shrink when idle, within bounds
Each answers the event's figures (prepare_s, commit_pause_ms, bytes_moved, gbps, requests_migrated); 409 while
another event runs, 400 for bad arguments, 503 when the event failed and was rolled back (still serving).
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from eep_hpc.head.coordinator import Coordinator, StartupError
from eep_hpc.head.events import ScaleBusy, ScaleFailed
from eep_hpc.serve.errors import ApiError, bad_request


class GrowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int = Field(0, ge=0, le=1024)
    pool: str = ""  # one pool (Slurm node shape); "" = the configured default
    pools: dict[str, int] | None = None  # several pools in one heterogeneous job: {"big": 2, "small": 1}
    wait: bool = True  # False: answer once submitted; the ranks join whenever the scheduler starts them


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    min: int = Field(ge=1)
    max: int = Field(ge=1)
    enabled: bool = True
    sustain_s: float | None = Field(None, gt=0)
    idle_s: float | None = Field(None, gt=0)
    queue_high: float | None = Field(None, ge=0)
    lifetime_s: float | None = Field(None, ge=0)


class ShrinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n: int | None = Field(None, ge=1)
    rank_ids: list[int] | None = None
    node: str | None = None


def pick_ranks(coordinator: Coordinator, req: ShrinkRequest) -> list[int]:
    given = [x is not None for x in (req.n, req.rank_ids, req.node)]
    if sum(given) != 1:
        raise bad_request("give exactly one of n, rank_ids, node")
    if req.rank_ids is not None:
        return req.rank_ids
    if req.node is not None:
        on_node = [r for r in coordinator.members if coordinator.ranks[r].host == req.node]
        if not on_node:
            raise bad_request(f"no member rank runs on node {req.node!r}", "node")
        return on_node
    if req.n >= len(coordinator.members):
        raise bad_request(f"cannot remove {req.n} of {len(coordinator.members)} ranks: at least one must stay", "n")
    return coordinator.members[-req.n :]  # the newest ranks leave first


async def _run(action):
    try:
        return await action
    except ScaleBusy as e:
        raise ApiError(409, str(e), "ConflictError", None, "scaling_in_progress") from None
    except ValueError as e:
        raise bad_request(str(e)) from None
    except (ScaleFailed, StartupError) as e:
        raise ApiError(503, f"scaling failed and was rolled back; still serving: {e}", "ScaleFailed", None,
                       "scale_rolled_back") from None


def add_admin_routes(app: FastAPI, coordinator: Coordinator) -> None:
    @app.post("/admin/scale/grow")
    async def grow(req: GrowRequest) -> dict:
        n = req.n if (req.n or req.pools) else 1
        if req.pools:
            unknown = [p for p in req.pools if p not in coordinator.cfg.pools]
            if unknown:
                raise bad_request(f"unknown pool(s) {unknown}; configured: {sorted(coordinator.cfg.pools)}", "pools")
        if req.pool and req.pool not in coordinator.cfg.pools:
            raise bad_request(f"unknown pool {req.pool!r}; configured: {sorted(coordinator.cfg.pools)}", "pool")
        action = coordinator.grow(0 if req.pools else n, req.pool, req.pools)
        if req.wait:
            return await _run(action)
        before = coordinator.next_rank_id
        task = asyncio.create_task(action)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are logged and in history
        await asyncio.sleep(0)  # let it submit
        return {"kind": "grow", "phase": "SUBMITTED", "rank_ids": list(range(before, coordinator.next_rank_id))}

    @app.post("/admin/scale/shrink")
    async def shrink(req: ShrinkRequest) -> dict:
        async def act():
            coordinator.check_idle()  # "busy" before judging the arguments against a membership about to change
            return await coordinator.shrink(pick_ranks(coordinator, req))

        return await _run(act())

    @app.post("/admin/adapt")
    async def adapt(req: AdaptRequest) -> dict:
        if req.min > req.max:
            raise bad_request(f"min ({req.min}) must not exceed max ({req.max})", "min")
        cfg = coordinator.cfg.adapt
        cfg.enabled, cfg.min_ranks, cfg.max_ranks = req.enabled, req.min, req.max
        for name in ("sustain_s", "idle_s", "queue_high", "lifetime_s"):
            if getattr(req, name) is not None:
                setattr(cfg, name, getattr(req, name))
        return coordinator.cluster_state()["adapt"]

    @app.post("/admin/rebalance")
    async def rebalance() -> dict:
        return await _run(coordinator.rebalance_experts())
