"""Logprobs between the engine and the OpenAI bodies: the engine's columnar `Logprobs` as one entry per token, and
a token's text and UTF-8 bytes (what both of OpenAI's logprobs shapes list). chat.py and completions.py lay the
entries out in their shapes."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from eep_hpc.model.tokenizer import byte_level_alphabet
from eep_hpc.protocol import Logprobs


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


def clamp_logprob(lp: float) -> float:
    """JSON has no -inf: OpenAI and vLLM report -9999.0 for impossible tokens."""
    return max(lp, -9999.0)


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
    table = byte_level_alphabet()
    if raw and all(c in table for c in raw):
        return text, tuple(table[c] for c in raw)
    return text, tuple(text.encode())
