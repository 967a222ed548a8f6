"""One request as a rank sees it: its tokens, how many of them have KV in the cache, and where that KV lives.

Tokens are prompt + output. A request migrated from another rank arrives with output tokens already produced:
they count towards `max_tokens` and are recomputed like prompt tokens (re-prefilled), never re-sampled.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import Enum, auto, unique

import torch

from eep_hpc.protocol import AddRequest, FinishReason, Logprobs, SamplingParams


@unique
class SequenceStatus(Enum):
    WAITING = auto()  # no KV blocks, num_computed_tokens == 0
    RUNNING = auto()  # holds KV blocks for its computed tokens
    FINISHED = auto()  # blocks returned; finish_reason says why


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: Iterable[int],
        sampling: SamplingParams | None = None,
        output_token_ids: Iterable[int] = (),
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"request {request_id!r}: empty prompt")
        self.output_token_ids = list(output_token_ids)
        self.sampling = sampling if sampling is not None else SamplingParams()
        self.num_computed_tokens = 0  # tokens whose KV is in the cache
        self.block_table: list[int] = []  # KV block ids, in token order; owned by the BlockManager
        # Prefix caching (owned by the BlockManager): hashes of full blocks of token_ids (tokens only grow, so
        # they stay valid), and how many leading blocks of block_table are registered in the cache.
        self.block_hashes: list[bytes] = []
        self.num_cached_blocks = 0
        # Logprobs of prompt tokens 1 .. computed so far (SamplingParams.prompt_logprobs), sent with the first
        # output. Only a sequence that starts without outputs computes them (a migrated one sent them already).
        self.prompt_logprobs: Logprobs | None = None
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        # The sampler reseeds it before every draw (see sampler.py) and moves it to the logits' device.
        self.generator: torch.Generator | None = None
        if self.sampling.seed is not None:
            self.generator = torch.Generator().manual_seed(self.sampling.seed & 0xFFFF_FFFF_FFFF_FFFF)

    @classmethod
    def from_add_request(cls, msg: AddRequest) -> Sequence:
        return cls(msg.request_id, msg.prompt_token_ids, msg.sampling, msg.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (decode reads one token of a long sequence)."""
        p = len(self.prompt_token_ids)
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:end] + self.output_token_ids[: max(end - p, 0)]

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.sampling.prompt_logprobs is not None and not self.output_token_ids

    def add_prompt_logprobs(self, start: int, chunk: Logprobs) -> None:
        """Logprobs of prompt tokens start+1 .. start+len(chunk); recomputed ones (after preemption) replace."""
        lp = self.prompt_logprobs or Logprobs()
        keep = start  # entries for tokens 1..start
        self.prompt_logprobs = Logprobs(
            token_logprobs=lp.token_logprobs[:keep] + chunk.token_logprobs,
            top_ids=lp.top_ids[:keep] + chunk.top_ids,
            top_logprobs=lp.top_logprobs[:keep] + chunk.top_logprobs,
        )

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.name}, tokens={self.num_prompt_tokens}+"
            f"{self.num_output_tokens}, computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )
