"""From a parsed request to engine choices: prompt token ids and SamplingParams, checked once.

The request models (openai_protocol.py) check what the body alone decides. What needs the engine is checked here,
before anything reaches it, each failure a 400 that names the field: client token ids against the vocabulary
(the one place they are checked), the prompt against the context window, max_tokens against what is left of it,
min_tokens against max_tokens. Long texts are tokenized (and chat templates rendered) off the event loop.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from eep_hpc.protocol import SamplingParams
from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.errors import bad_request
from eep_hpc.serve.openai_protocol import SEED_MAX, SamplingRequest

# Long prompts are tokenized (and chat templates rendered) off the event loop, one at a time.
_LONG_TEXT = 8192
_cpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="eep-tokenize")


@dataclass(slots=True)
class Choice:
    """One engine request behind an API request (prompts x n of them); `index` is its index in the response."""

    index: int
    prompt_token_ids: list[int]
    sampling: SamplingParams


async def off_loop(size: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs); in the tokenizer thread when `size` (characters) is large."""
    if size < _LONG_TEXT:
        return fn(*args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_cpu, lambda: fn(*args, **kwargs))


async def tokenize(engine: EngineClient, text: str, add_special_tokens: bool) -> list[int]:
    return await off_loop(len(text), engine.tokenizer.encode, text, add_special_tokens=add_special_tokens)


def vocab_size(engine: EngineClient) -> int | None:
    size = getattr(engine, "vocab_size", None) or getattr(engine.tokenizer, "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def check_token_ids(ids: list[int], engine: EngineClient) -> None:
    """Token ids a client sent (the request model has checked they are non-negative)."""
    vocab = vocab_size(engine)
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
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logprobs=req.num_logprobs,
        prompt_logprobs=req.num_prompt_logprobs,
    )


def prompt_choices(
    engine: EngineClient,
    req: SamplingRequest,
    ids: list[int],
    max_tokens: int | None,
    first_index: int,
    where: str = "prompt",
    param: str = "max_tokens",
) -> list[Choice]:
    """The n choices of one prompt, numbered from `first_index`. `where` names the prompt in messages
    ("prompt" or "messages"), `param` the field max_tokens came from."""
    max_tokens = resolve_max_tokens(len(ids), max_tokens, engine.max_model_len, where, param)
    return [Choice(first_index + j, ids, sampling_params(req, max_tokens, j)) for j in range(req.num_choices)]
