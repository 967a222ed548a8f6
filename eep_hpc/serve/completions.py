"""POST /v1/completions: prompts (text or token ids, batched) x n choices. The way of the request is serving.py's.

echo puts the prompt before the completion (in the first chunk of a stream); with logprobs, the prompt tokens'
logprobs come first too (the first prompt token's is null). text_offset counts characters of the choice's text.
"""

from __future__ import annotations

from typing import Any

from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.generation import ChoiceDelta
from eep_hpc.serve.logprobs import TokenLogprob, clamp_logprob, token_piece
from eep_hpc.serve.openai_protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from eep_hpc.serve.prompts import Choice, check_token_ids, prompt_choices, tokenize


class Completion:
    """One /v1/completions request, validated (serving.Endpoint): choice k is sample k % n of prompt k // n."""

    request_type = CompletionRequest
    id_prefix = "cmpl"
    chunk_type = CompletionStreamResponse
    body_type = CompletionResponse

    def __init__(self, choices: list[Choice], prompt_tokens: int, texts: list["ChoiceText"]) -> None:
        self.choices, self.prompt_tokens, self.texts = choices, prompt_tokens, texts

    @classmethod
    async def prepare(cls, req: CompletionRequest, engine: EngineClient) -> "Completion":
        tokenizer, add_special, n = engine.tokenizer, req.add_special_tokens is not False, req.num_choices
        prompts: list[list[int]] = []
        choices: list[Choice] = []
        for i, prompt in enumerate(req.prompt):
            if isinstance(prompt, str):
                ids = await tokenize(engine, prompt, add_special_tokens=add_special)
            else:
                ids = list(prompt)
                check_token_ids(ids, engine)
            choices += prompt_choices(engine, req, ids, req.max_tokens, i * n)
            prompts.append(ids)
        echoes: list[str | None] = [None] * len(prompts)
        if req.echo:  # the prompt as the client sent it, or its token ids as text
            for i, (prompt, ids) in enumerate(zip(req.prompt, prompts)):
                echoes[i] = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)
        logprobs = req.logprobs is not None
        texts = [ChoiceText(tokenizer, echoes[k // n], logprobs) for k in range(len(choices))]
        return cls(choices, sum(len(p) for p in prompts), texts)

    def first_choices(self) -> list[CompletionChoice]:
        return []

    def stream_choice(self, d: ChoiceDelta) -> CompletionChoice:
        text, logprobs = self.texts[d.index].add(d.text, d.logprobs, d.prompt_logprobs)
        return CompletionChoice(index=d.index, text=text, logprobs=logprobs, finish_reason=d.finish_reason)

    whole_choice = stream_choice  # a choice's whole output reads like one delta

    def plain_text(self, index: int) -> bool:
        text = self.texts[index]
        return text.echo is None and not text.logprobs


class ChoiceText:
    """What one choice has returned so far: the echo (once, first), and the offset of the next token's text."""

    def __init__(self, tokenizer: Any, echo: str | None, logprobs: bool) -> None:
        self.tokenizer, self.echo, self.logprobs = tokenizer, echo, logprobs
        self.offset = 0

    def add(
        self, text: str, tokens: list[TokenLogprob], prompt: list[TokenLogprob] | None
    ) -> tuple[str, CompletionLogprobs | None]:
        lp = CompletionLogprobs() if self.logprobs else None
        if self.echo is not None:
            if lp is not None:
                self._add(lp, prompt or [])
            text, self.offset, self.echo = self.echo + text, len(self.echo), None
        if lp is not None:
            self._add(lp, tokens)
        return text, lp

    def _add(self, lp: CompletionLogprobs, entries: list[TokenLogprob]) -> None:
        for e in entries:
            piece = token_piece(self.tokenizer, e.token_id)[0]
            lp.tokens.append(piece)
            lp.text_offset.append(self.offset)
            self.offset += len(piece)
            if e.logprob is None:
                lp.token_logprobs.append(None)
                lp.top_logprobs.append(None)
                continue
            lp.token_logprobs.append(clamp_logprob(e.logprob))
            # The chosen token is always listed (vLLM does too). Different tokens may have the same text (parts of
            # one character): a text keeps the chosen token's logprob, else its most likely token's.
            top = {piece: clamp_logprob(e.logprob)}
            for t, v in e.top:
                top.setdefault(token_piece(self.tokenizer, t)[0], clamp_logprob(v))
            lp.top_logprobs.append(top)
