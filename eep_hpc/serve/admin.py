"""Admin routes of the head: scale the serving group and re-place experts (bearer admin token when configured).

POST /admin/scale/grow      {"n": 2}                              start n ranks and bring them in
POST /admin/scale/shrink    {"n": 1} | {"rank_ids": [3]} | {"node": "host"}   drain and remove ranks
POST /admin/rebalance       {}                                   re-place experts by the load counted so far
POST /admin/adapt           {"min": 1, "max": 4}                 grow under load, shrink when idle, within bounds
Each answers the event's figures (prepare_s, commit_pause_ms, bytes_moved, gbps, requests_migrated); 409 while
another event runs, 400 for bad arguments, 503 when the event failed and was rolled back (still serving). A
rebalance whose placement equals the serving one runs no event and keeps the epoch: "phase": "UNCHANGED", "moved": 0.

The routes talk to a `ClusterAdmin` (the head's is head/admin.py), never to the head's state.
"""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from eep_hpc.serve.errors import ApiError, bad_request


class ScaleConflict(RuntimeError):
    """Another scaling event is in progress (409)."""


class ScaleRolledBack(RuntimeError):
    """The event failed and was rolled back; the service still serves (503)."""


class ClusterAdmin(Protocol):
    """What the admin routes may do. Bad arguments raise ValueError, and events ScaleConflict or ScaleRolledBack."""

    def pools(self) -> list[str]:
        """Names of the configured pools (node shapes)."""
        ...

    def members(self) -> dict[int, str]:
        """Member rank id -> its host, in epoch order (the newest last)."""
        ...

    def check_idle(self) -> None:
        """ScaleConflict while an event runs."""
        ...

    async def grow(self, n: int, pool: str, pools: dict[str, int] | None, wait: bool) -> dict:
        """n ranks of one pool, or {pool: count} in one job; wait=False answers once they are submitted."""
        ...

    async def shrink(self, rank_ids: list[int]) -> dict: ...

    async def rebalance(self) -> dict: ...

    def set_adapt(self, enabled: bool, min_ranks: int, max_ranks: int, **tuning: float) -> dict:
        """The adaptive-scaling policy from now on -> its state (enabled, min_ranks, max_ranks, last)."""
        ...


class GrowRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no coercion: `true` is not n = 1, "no" not false
    n: int | None = Field(None, ge=1, le=1024)  # None: 1, or the counts of `pools`
    pool: str = ""  # one pool (Slurm node shape); "" = the configured default
    # several pools in one heterogeneous job: {"big": 2, "small": 1}
    pools: dict[str, Annotated[int, Field(ge=1)]] | None = None
    wait: bool = True  # False: answer once submitted; the ranks join whenever the scheduler starts them


class AdaptRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    min: int = Field(ge=1)
    max: int = Field(ge=1)
    enabled: bool = True
    sustain_s: float | None = Field(None, gt=0)
    idle_s: float | None = Field(None, gt=0)
    queue_high: float | None = Field(None, ge=0)
    lifetime_s: float | None = Field(None, ge=0)


class ShrinkRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    n: int | None = Field(None, ge=1)
    rank_ids: list[int] | None = None
    node: str | None = None


def pick_ranks(members: dict[int, str], req: ShrinkRequest) -> list[int]:
    """members: rank id -> host, in epoch order."""
    given = [x is not None for x in (req.n, req.rank_ids, req.node)]
    if sum(given) != 1:
        raise bad_request("give exactly one of n, rank_ids, node")
    if req.rank_ids is not None:
        if not req.rank_ids:
            raise bad_request("rank_ids is empty: name at least one rank to remove", "rank_ids")
        return req.rank_ids  # members, or ranks still queued or starting (cancelled): the head checks which
    if req.node is not None:
        on_node = [r for r, host in members.items() if host == req.node]
        if not on_node:
            raise bad_request(f"no member rank runs on node {req.node!r}", "node")
        return on_node
    if req.n >= len(members):
        raise bad_request(f"cannot remove {req.n} of {len(members)} ranks: at least one must stay", "n")
    return list(members)[-req.n :]  # the newest ranks leave first


async def _run(action):
    try:
        return await action
    except ScaleConflict as e:
        raise ApiError(409, str(e), "ConflictError", None, "scaling_in_progress") from None
    except ValueError as e:
        raise bad_request(str(e)) from None
    except ScaleRolledBack as e:
        raise ApiError(503, f"scaling failed and was rolled back; still serving: {e}", "ScaleFailed", None,
                       "scale_rolled_back") from None


def add_admin_routes(app: FastAPI, admin: ClusterAdmin) -> None:
    @app.post("/admin/scale/grow")
    async def grow(req: GrowRequest) -> dict:
        if req.pools is not None and req.n is not None:
            raise bad_request("give n (with one pool) or pools, not both", "n")
        if req.pools is not None and not req.pools:
            raise bad_request("pools is empty: give at least one {pool: count}", "pools")
        n = 1 if req.n is None else req.n
        pools = admin.pools()
        if req.pools:
            unknown = [p for p in req.pools if p not in pools]
            if unknown:
                raise bad_request(f"unknown pool(s) {unknown}; configured: {sorted(pools)}", "pools")
        if req.pool and req.pool not in pools:
            raise bad_request(f"unknown pool {req.pool!r}; configured: {sorted(pools)}", "pool")
        return await _run(admin.grow(0 if req.pools else n, req.pool, req.pools, req.wait))

    @app.post("/admin/scale/shrink")
    async def shrink(req: ShrinkRequest) -> dict:
        async def act():
            admin.check_idle()  # "busy" before judging the arguments against a membership about to change
            return await admin.shrink(pick_ranks(admin.members(), req))

        return await _run(act())

    @app.post("/admin/adapt")
    async def adapt(req: AdaptRequest) -> dict:
        if req.min > req.max:
            raise bad_request(f"min ({req.min}) must not exceed max ({req.max})", "min")
        tuning = {name: getattr(req, name) for name in ("sustain_s", "idle_s", "queue_high", "lifetime_s")
                  if getattr(req, name) is not None}
        return admin.set_adapt(req.enabled, req.min, req.max, **tuning)

    @app.post("/admin/rebalance")
    async def rebalance() -> dict:
        return await _run(admin.rebalance())
