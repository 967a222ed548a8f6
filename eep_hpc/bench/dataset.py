"""Random prompts as token ids, like vLLM's `--dataset-name random`.

Each request gets an input length and an output length drawn uniformly from
[len * (1 - range_ratio), len * (1 + range_ratio)] (at least 1), and a prompt of that many token ids drawn from a
safe slice of the vocabulary: ids below SKIP_LOW (where tokenizers such as the tiny one and Mixtral keep special
tokens) and the top 5% (Qwen's special tokens and embedding padding) are never drawn. The prompt is sent as
token ids, so the input length is exact; `ignore_eos` with `max_tokens` = output length makes the output exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SKIP_LOW = 16


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    output_len: int

    @property
    def input_len(self) -> int:
        return len(self.prompt)


def token_range(vocab_size: int) -> tuple[int, int]:
    """[low, high) of the token ids prompts are drawn from."""
    low = min(SKIP_LOW, vocab_size // 4)
    high = max(low + 1, vocab_size - max(1, vocab_size // 20))
    return low, high


def lengths(rng: np.random.Generator, mean: int, range_ratio: float, n: int) -> np.ndarray:
    lo = max(1, int(np.floor(mean * (1 - range_ratio))))
    hi = max(lo, int(np.ceil(mean * (1 + range_ratio))))
    return rng.integers(lo, hi + 1, size=n)


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float, vocab_size: int,
                    seed: int = 0) -> list[BenchRequest]:
    if not 0 <= range_ratio < 1:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be at least 1")
    rng = np.random.default_rng(seed)
    ins, outs = lengths(rng, input_len, range_ratio, num), lengths(rng, output_len, range_ratio, num)
    low, high = token_range(vocab_size)
    return [BenchRequest(rng.integers(low, high, size=int(i)).tolist(), int(o)) for i, o in zip(ins, outs)]
