"""The head's side of the admin routes (serve/admin.py's ClusterAdmin): scaling, rebalancing and the adaptive
policy, with the head's errors as the routes know them (ScaleBusy -> ScaleConflict; a failed, rolled-back event ->
ScaleRolledBack)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager

from eep_hpc.head.autoscaler import Autoscaler
from eep_hpc.head.epoch_exchange import EpochExchange
from eep_hpc.head.events import ScaleBusy, ScaleFailed
from eep_hpc.head.membership import Membership, StartupError
from eep_hpc.head.scaling import Scaling
from eep_hpc.serve.admin import ScaleConflict, ScaleRolledBack


@contextmanager
def _as_admin_errors() -> Iterator[None]:
    try:
        yield
    except ScaleBusy as e:
        raise ScaleConflict(str(e)) from None
    except (ScaleFailed, StartupError) as e:
        raise ScaleRolledBack(str(e)) from None


class HeadAdmin:
    def __init__(self, membership: Membership, exchange: EpochExchange, scaling: Scaling, autoscaler: Autoscaler,
                 pools: list[str], spawn: Callable[[Coroutine], asyncio.Task]):
        self.membership, self.exchange, self.scaling, self.autoscaler = membership, exchange, scaling, autoscaler
        self._pools, self.spawn = list(pools), spawn

    def pools(self) -> list[str]:
        return list(self._pools)

    def members(self) -> dict[int, str]:
        m = self.membership
        return {r: m.ranks[r].host for r in m.members}

    def check_idle(self) -> None:
        with _as_admin_errors():
            self.exchange.check_idle()

    async def grow(self, n: int, pool: str, pools: dict[str, int] | None, wait: bool) -> dict:
        with _as_admin_errors():
            if wait:
                return await self.scaling.grow(n, pool, pools)
            joining = await self.scaling.submit(n, pool, pools)
        task = self.spawn(self.scaling.bring_in(joining))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # failures are logged and in history
        return {"kind": "grow", "phase": "SUBMITTED", "rank_ids": joining}

    async def shrink(self, rank_ids: list[int]) -> dict:
        with _as_admin_errors():
            return await self.scaling.shrink(rank_ids)

    async def rebalance(self) -> dict:
        with _as_admin_errors():
            return await self.scaling.rebalance()

    def set_adapt(self, enabled: bool, min_ranks: int, max_ranks: int, **tuning: float) -> dict:
        self.autoscaler.adjust(enabled=enabled, min_ranks=min_ranks, max_ranks=max_ranks, **tuning)
        return self.autoscaler.state()
