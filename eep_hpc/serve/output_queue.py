"""The outputs of one engine request on their way to its stream's writer, coalesced when the writer is behind.

Ranks step in lockstep, so every open stream's next token reaches an API process in the same instant, and one event
loop writes them one after another; a stream whose writer has not run since its last output finds several queued
(vLLM v1's RequestOutputCollector has the same problem). `get` then returns them as one output: the tokens in order,
their logprobs in order, the last one's finish, so the writer sends one SSE event with one socket write in place of
one per token. A writer that keeps up finds one output each time and sends one event per token, as before.

Not merged: an output that ends the request with an error or an abort (the writer sends such an end as an error
event, which would drop the text of the tokens merged before it), one with prompt logprobs (they come with a
request's first output), and outputs whose logprobs do not line up with their tokens.

A sink (`OutputQueue(sink)`: serving.py's direct lane for a plain streamed choice) takes an output where it arrives,
in the head's dispatch of a rank's step, instead of waking the writer: while the writer waits in `get` with nothing
queued, each output is first offered to the sink, which either handles it all the way to the socket (True: the writer
sleeps on) or declines it before changing anything (False: it is queued and the writer wakes, as without a sink).
So a plain stream costs no task wake-up per token, only at its end and wherever the sink cannot go on (a finish, the
socket's buffer full). A sink that raises is dropped, and its exception is raised from `get`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import Callable

from eep_hpc import protocol as P

logger = logging.getLogger(__name__)

Sink = Callable[[P.RequestOutput], bool]  # True: handled (written), False: declined, nothing changed


class OutputQueue:
    __slots__ = ("_outputs", "_waiter", "sink", "_failure")

    def __init__(self, sink: Sink | None = None) -> None:
        self._outputs: deque[P.RequestOutput] = deque()
        self._waiter: asyncio.Future | None = None
        self.sink = sink
        self._failure: BaseException | None = None

    def put_nowait(self, out: P.RequestOutput) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            # The writer waits with nothing queued: what the sink takes needs no wake-up (outputs stay in order:
            # the sink sees one only while none is queued before it, and never while the writer runs).
            sink = self.sink
            if sink is not None:
                try:
                    if sink(out):
                        return
                except Exception as e:  # a bug in the sink: not the dispatcher's (other streams'), the writer's
                    logger.exception("a stream's direct writer failed")
                    self.sink, self._failure = None, e
            self._outputs.append(out)
            waiter.set_result(None)
            return
        self._outputs.append(out)

    async def get(self) -> P.RequestOutput:
        """The next output, with every output queued behind it that can be merged into it."""
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise failure
        while not self._outputs:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            if self._failure is not None:
                failure, self._failure = self._failure, None
                raise failure
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
