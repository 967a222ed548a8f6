"""Choices to text: one engine request per choice, its tokens detokenized with stop strings applied, as a stream
of `ChoiceDelta`s; `generate` interleaves the choices of one API request, `collect` joins them into whole texts.

Closing a stream (the consumer stops early, a stop string matched, the client left) closes the engine generator,
which aborts that engine request. An engine failure ends its choice with finish_reason "error".

The direct lane (a `Lane`, serving.py's and sse.py's: one streamed choice, no logprobs): where the engine takes a sink
(EngineClient.takes_sink), each output of one token, not finishing, is detokenized, checked for stop strings and its
text handed to `lane.emit` where the engine dispatches it, while the choice's consumer sleeps; the same steps as the
loop below, on the same state. Whatever the lane cannot take (`lane.ready()` false, a finish, logprobs, several
tokens) comes through the loop as before; a stop string the lane finds ends the choice there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Protocol

from eep_hpc.model.tokenizer import IncrementalDetokenizer
from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.logprobs import TokenLogprob, token_logprobs
from eep_hpc.serve.metrics import ApiMetrics
from eep_hpc.serve.openai_protocol import SamplingRequest
from eep_hpc.serve.prompts import Choice
from eep_hpc.serve.stop_strings import StopMatcher

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class TextOptions:
    stop: list[str]
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @classmethod
    def of(cls, req: SamplingRequest) -> "TextOptions":
        return cls(
            stop=list(req.stop or []),
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            skip_special_tokens=req.skip_special_tokens is not False,
        )


class Lane(Protocol):
    opened: bool  # it has a way to the client (else the engine gets no sink)

    def ready(self) -> bool:
        """Whether `emit` may be called now (asked before the output is taken: nothing is consumed if not)."""
        ...

    def emit(self, text: str, num_tokens: int) -> None:
        """Send a delta of text alone (the choice's `num_tokens` completion tokens so far) to the client."""
        ...


@dataclass(slots=True)
class ChoiceDelta:
    """New text of one choice (or, from `collect`, its whole text)."""

    index: int
    text: str
    num_tokens: int  # completion tokens of this choice so far
    finish_reason: str | None = None
    error: str = ""
    # Logprobs of the completion tokens behind this delta (requests with logprobs), in order.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Every prompt token's, in the first delta of a request with prompt logprobs (echo).
    prompt_logprobs: list[TokenLogprob] | None = None


def generate(
    engine: EngineClient,
    metrics: ApiMetrics,
    request_id: str,
    choices: list[Choice],
    options: TextOptions,
    lane: Lane | None = None,
) -> AsyncIterator[ChoiceDelta]:
    """The deltas of every choice as they come; engine request ids are `{request_id}-{choice index}`. `lane`: the
    direct lane of a single choice (see the module's docstring)."""
    arrival = time.monotonic()
    if len(choices) == 1:  # one choice: no generator layer per token
        return generate_choice(engine, metrics, arrival, f"{request_id}-{choices[0].index}", choices[0], options,
                               lane)
    return merge([generate_choice(engine, metrics, arrival, f"{request_id}-{c.index}", c, options) for c in choices])


async def _closing(gen: Any) -> None:
    aclose = getattr(gen, "aclose", None)
    if aclose is not None:
        await aclose()


async def generate_choice(
    engine: EngineClient,
    metrics: ApiMetrics,
    arrival: float,
    request_id: str,
    choice: Choice,
    options: TextOptions,
    lane: Lane | None = None,
) -> AsyncIterator[ChoiceDelta]:
    """Text of one choice; the last delta has finish_reason set ("error" with .error for engine failures)."""
    detok = IncrementalDetokenizer(
        engine.tokenizer, choice.prompt_token_ids, skip_special_tokens=options.skip_special_tokens
    )
    stops = StopMatcher(options.stop, options.include_stop_str_in_output)
    min_tokens = choice.sampling.min_tokens
    tracker = metrics.track(arrival, len(choice.prompt_token_ids))
    index, n, reason = choice.index, 0, "abort"  # closed before finishing = aborted
    want_prompt_logprobs = choice.sampling.prompt_logprobs is not None
    outputs = None
    stopped: str | None = None  # the text before (with) a stop string the lane found, which ends the choice

    def sink(out) -> bool:  # the loop's steps for an output of one token, text only, where the engine has it
        nonlocal n, stopped
        new_ids = out.new_token_ids
        if len(new_ids) != 1 or out.finish_reason is not None or out.logprobs is not None or not lane.ready():
            return False
        tracker.tokens(1)
        n += 1
        text = detok.add(new_ids)
        if stops.stop:
            text = stops.feed(text, check=n > min_tokens)
            if stops.matched is not None:  # the loop ends the choice with it (this output is the next it gets)
                stopped = text
                return False
        if text:
            lane.emit(text, n)
        return True

    direct = (lane is not None and lane.opened and getattr(engine, "takes_sink", False) and not want_prompt_logprobs
              and choice.sampling.logprobs is None)
    try:
        try:
            if direct:
                outputs = engine.generate(request_id, choice.prompt_token_ids, choice.sampling, sink=sink)
            else:
                outputs = engine.generate(request_id, choice.prompt_token_ids, choice.sampling)
            async for out in outputs:
                if stopped is not None:
                    reason = "stop"
                    yield ChoiceDelta(index, stopped, n, "stop")
                    return
                new_ids = out.new_token_ids
                tracker.tokens(len(new_ids))
                if (len(new_ids) == 1 and out.finish_reason is None and out.logprobs is None and not stops.stop
                        and not want_prompt_logprobs):  # the usual output: one token, text only
                    n += 1
                    text = detok.add(new_ids)
                    if text:
                        yield ChoiceDelta(index, text, n)
                    continue
                logprobs = token_logprobs(new_ids, out.logprobs) if out.logprobs is not None else []
                prompt_logprobs = None
                if want_prompt_logprobs and new_ids:  # they come with the first token
                    want_prompt_logprobs = False
                    prompt = choice.prompt_token_ids
                    prompt_logprobs = [TokenLogprob(prompt[0], None, [])]
                    prompt_logprobs += token_logprobs(prompt[1:], out.prompt_logprobs)
                pieces = []
                for k, token_id in enumerate(new_ids):
                    n += 1
                    pieces.append(stops.feed(detok.add([token_id]), check=n > min_tokens))
                    if stops.matched is not None:
                        reason = "stop"
                        yield ChoiceDelta(index, "".join(pieces), n, "stop", "", logprobs[: k + 1], prompt_logprobs)
                        return
                if out.finish_reason is not None:
                    # A character the last ids left incomplete comes out now (as U+FFFD).
                    pieces.append(stops.feed(detok.flush(), check=n > min_tokens))
                    if stops.matched is None:
                        pieces.append(stops.flush())
                    matched = stops.matched is not None and out.finish_reason != "error"
                    reason = "stop" if matched else out.finish_reason
                    yield ChoiceDelta(index, "".join(pieces), n, reason, out.error, logprobs, prompt_logprobs)
                    return
                text = "".join(pieces)
                if text or logprobs or prompt_logprobs:
                    yield ChoiceDelta(index, text, n, None, "", logprobs, prompt_logprobs)
            error = "the engine ended the request without a finish reason"
        except Exception as e:  # the engine failed this request: end this choice only
            logger.exception("engine request %s failed", request_id)
            error = f"{type(e).__name__}: {e}"
        reason = "error"
        yield ChoiceDelta(index, stops.flush(), n, "error", error)
    finally:
        tracker.finish(reason)
        await _closing(outputs)


async def merge(streams: list[AsyncIterator[ChoiceDelta]]) -> AsyncIterator[ChoiceDelta]:
    """Interleave the choices' deltas as they come; closing the merge closes every stream."""
    queue: asyncio.Queue[ChoiceDelta | Exception | None] = asyncio.Queue()

    async def pump(stream: AsyncIterator[ChoiceDelta]) -> None:
        try:
            async for d in stream:
                queue.put_nowait(d)
        except Exception as e:  # a bug, not an engine failure (those are deltas): fail the whole request
            queue.put_nowait(e)
        finally:
            await _closing(stream)
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        running = len(tasks)
        while running:
            d = await queue.get()
            if d is None:
                running -= 1
            elif isinstance(d, Exception):
                raise d
            else:
                yield d
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Collected:
    choices: list[ChoiceDelta]  # per choice, all of its text, logprobs and tokens
    error: str = ""  # the first engine error (its choice and those not finished yet are incomplete)
    finish_reason: str | None = None  # of the choice that ended with `error`: "error", or "abort" by the server


async def collect(stream: AsyncIterator[ChoiceDelta], num_choices: int) -> Collected:
    """Whole texts of a non-streaming request; stops at the first engine error."""
    choices = [ChoiceDelta(k, "", 0) for k in range(num_choices)]
    parts: list[list[str]] = [[] for _ in range(num_choices)]
    out = Collected(choices)
    try:
        async for d in stream:
            c = choices[d.index]
            parts[d.index].append(d.text)
            c.logprobs += d.logprobs
            if d.prompt_logprobs is not None:
                c.prompt_logprobs = d.prompt_logprobs
            c.num_tokens = d.num_tokens
            if d.finish_reason is not None:
                c.finish_reason = d.finish_reason
                if d.finish_reason == "error" or d.error:  # failed, or ended by the server (shutting down)
                    out.error, out.finish_reason = d.error or "engine error", d.finish_reason
                    break
    finally:
        await _closing(stream)
    for c, p in zip(choices, parts):
        c.text = "".join(p)
    return out
