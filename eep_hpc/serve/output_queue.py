"""The outputs of one engine request on their way to its stream's writer, coalesced when the writer is behind.

Ranks step in lockstep, so every open stream's next token reaches an API process in the same instant, and one event
loop writes them one after another; a stream whose writer has not run since its last output finds several queued
(vLLM v1's RequestOutputCollector has the same problem). `get` then returns them as one output: the tokens in order,
their logprobs in order, the last one's finish, so the writer sends one SSE event with one socket write in place of
one per token. A writer that keeps up finds one output each time and sends one event per token, as before.

Not merged: an output that ends the request with an error or an abort (the writer sends such an end as an error
event, which would drop the text of the tokens merged before it), one with prompt logprobs (they come with a
request's first output), and outputs whose logprobs do not line up with their tokens.
"""

from __future__ import annotations

import asyncio
from collections import deque

from eep_hpc import protocol as P


class OutputQueue:
    __slots__ = ("_outputs", "_waiter")

    def __init__(self) -> None:
        self._outputs: deque[P.RequestOutput] = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, out: P.RequestOutput) -> None:
        self._outputs.append(out)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> P.RequestOutput:
        """The next output, with every output queued behind it that can be merged into it."""
        while not self._outputs:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        outputs = self._outputs
        first = outputs.popleft()
        if not outputs or not _open(first):
            return first
        batch = [first]
        while outputs and _joins(batch[-1], outputs[0]):
            batch.append(outputs.popleft())
            if not _open(batch[-1]):
                break
        return merged(batch) if len(batch) > 1 else first


def _open(out: P.RequestOutput) -> bool:
    """Tokens may still follow it in the same output (it does not end the request)."""
    return out.finish_reason is None


def _aligned(out: P.RequestOutput) -> bool:
    return out.logprobs is None or len(out.logprobs) == len(out.new_token_ids)


def _joins(prev: P.RequestOutput, out: P.RequestOutput) -> bool:
    if out.error or out.finish_reason in ("error", "abort") or out.prompt_logprobs is not None:
        return False
    if not out.new_token_ids and out.logprobs is None:  # a bare finish ("stop", "length")
        return True
    return (prev.logprobs is None) == (out.logprobs is None) and _aligned(prev) and _aligned(out)


def merged(batch: list[P.RequestOutput]) -> P.RequestOutput:
    """One output for consecutive outputs of one request (the first may carry prompt logprobs, the last a finish)."""
    first, last = batch[0], batch[-1]
    logprobs = None
    if first.logprobs is not None:
        parts = [o.logprobs for o in batch if o.logprobs is not None]
        logprobs = P.Logprobs(token_logprobs=[v for lp in parts for v in lp.token_logprobs],
                              top_ids=[v for lp in parts for v in lp.top_ids],
                              top_logprobs=[v for lp in parts for v in lp.top_logprobs])
    return P.RequestOutput(request_id=first.request_id, new_token_ids=[t for o in batch for t in o.new_token_ids],
                           finish_reason=last.finish_reason, error=last.error, logprobs=logprobs,
                           prompt_logprobs=first.prompt_logprobs)
