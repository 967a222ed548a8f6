"""Issue the requests: arrivals, concurrency limit, and the rule for a scale plan that outlasts the prompts.

Arrivals: `request_rate` = inf sends every request at once; a finite rate draws Poisson arrivals (exponential gaps
with mean 1/rate, from a seeded RNG). `max_concurrency` caps requests in flight: as in vLLM, a request that arrives
while the cap is reached waits for a free slot.

Scale plans: the load must cover the whole plan. When all `num_prompts` requests have been issued and the plan is
still running, the driver keeps issuing requests (cycling through the same prompts, at the same rate) until the
plan finishes, with at most `max_concurrency` (or, without one, `num_prompts`) in flight; then it stops issuing
and waits for the requests in flight. Every request counts in the metrics, so `completed` may exceed num_prompts.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np

from eep_hpc.bench.client import ERROR_CHARS, RequestResult
from eep_hpc.bench.dataset import BenchRequest
from eep_hpc.bench.progress import Progress


@dataclass
class LoadOutcome:
    results: list[RequestResult]
    duration: float  # seconds from the first request issued to the last one finished
    start: float  # time.perf_counter() when the first request was issued


async def run_load(
    send: Callable[[BenchRequest], Awaitable[RequestResult]],
    requests: list[BenchRequest],
    request_rate: float = math.inf,
    max_concurrency: int | None = None,
    keep_going: asyncio.Future | None = None,
    progress: Progress | None = None,
    seed: int = 0,
) -> LoadOutcome:
    """`keep_going`: while this future is not done, issue more requests after the first len(requests)."""
    rng = np.random.default_rng(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    cap = max_concurrency or len(requests)
    pending: set[asyncio.Task] = set()
    results: list[RequestResult] = []

    async def one(req: BenchRequest) -> None:
        if limit:
            await limit.acquire()
        if progress:
            progress.started()
        try:
            result = await send(req)
        except Exception as e:  # a bug in one request must not stop the run
            result = RequestResult(req.input_len, error=f"{type(e).__name__}: {e}"[:ERROR_CHARS])
        finally:
            if limit:
                limit.release()
        results.append(result)
        if progress:
            progress.finished(result.success)

    def extending() -> bool:
        return keep_going is not None and not keep_going.done()

    start = time.perf_counter()
    for i in itertools.count():
        if i >= len(requests):
            if not extending():
                break
            while len(pending) >= cap and extending():
                await asyncio.wait(pending | {keep_going}, return_when=asyncio.FIRST_COMPLETED)
            if not extending():
                break
        task = asyncio.create_task(one(requests[i % len(requests)]))
        pending.add(task)
        task.add_done_callback(pending.discard)
        if math.isfinite(request_rate):
            gap = rng.exponential(1.0 / request_rate)
            if i + 1 >= len(requests) and extending():
                await asyncio.wait({keep_going}, timeout=gap)  # stop waiting as soon as the plan is done
            else:
                await asyncio.sleep(gap)
        elif i % 64 == 63:
            await asyncio.sleep(0)  # let the sends start while issuing many at once
    if pending:
        await asyncio.gather(*pending)
    return LoadOutcome(results, time.perf_counter() - start, start)
