"""What the HTTP front needs from the engine: the coordinator implements it; the API only calls these members."""

from __future__ import annotations

from typing import TYPE_CHECKING, AsyncIterator, Protocol

from eep_hpc.protocol import RequestOutput, SamplingParams

if TYPE_CHECKING:
    from eep_hpc.model.tokenizer import Tokenizer


class EngineClient(Protocol):
    model_name: str  # the served model id, what clients put in "model"
    max_model_len: int  # prompt + completion tokens of one request
    tokenizer: "Tokenizer"
    vocab_size: int | None  # the model's; client token ids are checked against it here, and nowhere else

    def generate(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as the ranks produce them; the last one has finish_reason set
        ("stop" | "length" | "abort" | "error", with the error text in .error).

        A consumer that stops early (aclose() or cancellation: a stop string matched, the client left) makes the
        engine abort the request and free its KV blocks.
        """
        ...

    # Engines that take generate(..., sink=) set `takes_sink = True`: the request's outputs are offered to the sink
    # where they arrive while its consumer waits (serve/output_queue.py), the rest come from the iterator as usual.

    def ready(self) -> bool:
        """True while requests can be served (at least one epoch is committed)."""
        ...

    def cluster_state(self) -> dict:
        """JSON-able state for the admin routes (ranks, epochs, per-rank kv_blocks_used, …)."""
        ...
