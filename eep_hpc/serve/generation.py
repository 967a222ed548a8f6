"""From a validated request to text: prompt checks, SamplingParams, engine requests, detokenized text with stop
strings applied. Shared by /v1/completions and /v1/chat/completions, streaming or not.

One API request becomes one engine request per choice (prompts x n). Each choice is a stream of `ChoiceDelta`s;
`merge` interleaves them. Closing a stream (the consumer stops early, a stop string matched, the client left)
closes the engine generator, which aborts that engine request.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from eep_hpc.model.tokenizer import IncrementalDetokenizer
from eep_hpc.protocol import Logprobs, SamplingParams
from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.errors import bad_request
from eep_hpc.serve.metrics import ApiMetrics
from eep_hpc.serve.openai_protocol import SEED_MAX, SamplingRequest
from eep_hpc.serve.stop_strings import StopMatcher

logger = logging.getLogger(__name__)

# Long prompts are tokenized (and chat templates rendered) off the event loop, one at a time.
_LONG_TEXT = 8192
_cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eep-tokenize")


async def off_loop(size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if size < _LONG_TEXT:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_cpu, lambda: fn(*args, **kwargs))


# ---- checks -------------------------------------------------------------------------------------------------


def vocab_size(engine: EngineClient) -> int | None:
    size = getattr(engine, "vocab_size", None) or getattr(engine.tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def check_token_ids(ids: list[int], vocab: int | None) -> None:
    if vocab is not None:
        bad = next((t for t in ids if t >= vocab), None)
        if bad is not None:
            raise bad_request(f"Token id {bad} in the prompt is out of vocabulary (size {vocab}).", "prompt")


def resolve_max_tokens(
    prompt_len: int, max_tokens: int | None, max_model_len: int, where: str, param: str = "max_tokens"
) -> int:
    """Check the context window like vLLM does; None means "the rest of the context". `param` is the request
    field max_tokens came from (chat: max_tokens or max_completion_tokens)."""
    if prompt_len == 0:
        raise bad_request(f"The {where} must not be empty.", "prompt" if where == "prompt" else "messages")
    if prompt_len >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_len} input tokens. Please reduce the length of the {where}.",
            "prompt" if where == "prompt" else "messages",
        )
    if max_tokens is None:
        return max_model_len - prompt_len
    if prompt_len + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {where}, {max_tokens} in the completion). "
            f"Please reduce the length of the {where} or completion.",
            param,
        )
    return max_tokens


def sampling_params(req: SamplingRequest, max_tokens: int, copy: int) -> SamplingParams:
    """copy = index among the n samples of one prompt; seeded copies get distinct seeds (seed + copy)."""
    if req.min_tokens and req.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({max_tokens}).", "min_tokens")
    seed = req.seed
    if seed is not None and copy:
        seed = seed + copy if seed + copy <= SEED_MAX else seed - copy
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=seed,
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
        stop_token_ids=list(req.stop_token_ids or []),
        logprobs=req.num_logprobs,
        prompt_logprobs=req.num_prompt_logprobs,
    )


# ---- running choices ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class Choice:
    """One engine request behind an API request."""

    index: int
    prompt_token_ids: list[int]
    sampling: SamplingParams


@dataclass(slots=True)
class TextOptions:
    stop: list[str]
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True


@dataclass(slots=True)
class TokenLogprob:
    """One token's logprob (raw model distribution, see engine/sampler.py) and the most likely tokens there."""

    token_id: int
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


def token_logprobs(token_ids: list[int], lp: Logprobs | None) -> list[TokenLogprob]:
    """The entries of `lp` for token_ids (as many as both have)."""
    if lp is None:
        return []
    return [
        TokenLogprob(t, lp.token_logprobs[i], list(zip(lp.top_ids[i], lp.top_logprobs[i])))
        for i, t in enumerate(token_ids[: len(lp)])
    ]


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    num_tokens: int  # completion tokens of this choice so far
    finish_reason: str | None = None
    error: str = ""
    # Logprobs of the completion tokens behind this delta (requests with logprobs), in order.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # Every prompt token's, in the first delta of a request with prompt logprobs (echo).
    prompt_logprobs: list[TokenLogprob] | None = None


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
    try:
        try:
            outputs = engine.generate(request_id, choice.prompt_token_ids, choice.sampling)
            async for out in outputs:
                tracker.tokens(len(out.new_token_ids))
                pieces = []
                logprobs = token_logprobs(out.new_token_ids, out.logprobs)
                prompt_logprobs = None
                if want_prompt_logprobs and out.new_token_ids:  # they come with the first token
                    want_prompt_logprobs = False
                    prompt = choice.prompt_token_ids
                    prompt_logprobs = [TokenLogprob(prompt[0], None, [])]
                    prompt_logprobs += token_logprobs(prompt[1:], out.prompt_logprobs)
                for k, token_id in enumerate(out.new_token_ids):
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
    if len(streams) == 1:
        try:
            async for d in streams[0]:
                yield d
        finally:
            await _closing(streams[0])
        return

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
    texts: list[str]
    finish_reasons: list[str | None]
    num_tokens: list[int]
    error: str = ""
    logprobs: list[list[TokenLogprob]] = field(default_factory=list)  # per choice, its completion tokens'
    prompt_logprobs: list[list[TokenLogprob] | None] = field(default_factory=list)  # per choice


async def collect(stream: AsyncIterator[ChoiceDelta], num_choices: int) -> Collected:
    """Whole texts of a non-streaming request; stops at the first engine error."""
    parts: list[list[str]] = [[] for _ in range(num_choices)]
    out = Collected([], [None] * num_choices, [0] * num_choices)
    out.logprobs = [[] for _ in range(num_choices)]
    out.prompt_logprobs = [None] * num_choices
    try:
        async for d in stream:
            parts[d.index].append(d.text)
            out.logprobs[d.index] += d.logprobs
            if d.prompt_logprobs is not None:
                out.prompt_logprobs[d.index] = d.prompt_logprobs
            out.num_tokens[d.index] = d.num_tokens
            if d.finish_reason is not None:
                out.finish_reasons[d.index] = d.finish_reason
                if d.finish_reason == "error":
                    out.error = d.error or "engine error"
                    break
    finally:
        await _closing(stream)
    out.texts = ["".join(p) for p in parts]
    return out


def start_choices(
    engine: EngineClient,
    metrics: ApiMetrics,
    request_id: str,
    choices: list[Choice],
    options: TextOptions,
    arrival: float | None = None,
) -> AsyncIterator[ChoiceDelta]:
    arrival = time.monotonic() if arrival is None else arrival
    streams = [
        generate_choice(engine, metrics, arrival, f"{request_id}-{c.index}", c, options) for c in choices
    ]
    return merge(streams)


# ---- logprobs as text -----------------------------------------------------------------------------------------


def clamp_logprob(lp: float) -> float:
    """JSON has no -inf: OpenAI and vLLM report -9999.0 for impossible tokens."""
    return max(lp, -9999.0)


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level BPE: the printable character each byte is written as -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


@functools.lru_cache(maxsize=65536)
def token_piece(tokenizer: Any, token_id: int) -> tuple[str, tuple[int, ...]]:
    """A token's text on its own (special tokens included) and its UTF-8 bytes. A token holding part of a
    character decodes to U+FFFD; its bytes then come from the vocabulary entry (byte-level BPE or <0xNN>)."""
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if "\ufffd" not in text:
        return text, tuple(text.encode())
    raw = tokenizer.backend.id_to_token(token_id) or ""
    if len(raw) == 6 and raw.startswith("<0x") and raw.endswith(">"):
        return text, (int(raw[3:5], 16),)
    table = _byte_decoder()
    if raw and all(c in table for c in raw):
        return text, tuple(table[c] for c in raw)
    return text, tuple(text.encode())
