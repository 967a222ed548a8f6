"""POST /v1/completions: prompts (text or token ids, batched) x n choices, streaming or not.

echo puts the prompt before the completion (in the first chunk of a stream); with logprobs, the prompt tokens'
logprobs come first too (the first prompt token's is null). text_offset counts characters of the choice's text.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from eep_hpc.serve.generation import (
    Choice,
    ChoiceDelta,
    TokenLogprob,
    check_token_ids,
    clamp_logprob,
    off_loop,
    resolve_max_tokens,
    sampling_params,
    token_piece,
    vocab_size,
)
from eep_hpc.serve.openai_protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    now,
    random_id,
)
from eep_hpc.serve.serving import Serving, dump_chunk


class ChoiceText:
    """What one choice has returned so far: the echo (once, first), and the offset of the next token's text."""

    def __init__(self, tokenizer, echo: str | None, logprobs: bool) -> None:
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


async def create_completion(serving: Serving, request: Request) -> Response:
    req = await serving.parse(request, CompletionRequest)
    engine = serving.engine
    tokenizer, vocab = engine.tokenizer, vocab_size(engine)
    add_special = req.add_special_tokens is not False
    n = req.num_choices
    prompts: list[list[int]] = []
    choices: list[Choice] = []
    for i, prompt in enumerate(req.prompt):
        if isinstance(prompt, str):
            ids = await off_loop(len(prompt), tokenizer.encode, prompt, add_special_tokens=add_special)
        else:
            ids = list(prompt)
            check_token_ids(ids, vocab)
        max_tokens = resolve_max_tokens(len(ids), req.max_tokens, engine.max_model_len, "prompt")
        prompts.append(ids)
        choices += [Choice(i * n + j, ids, sampling_params(req, max_tokens, j)) for j in range(n)]

    request_id, created, model = random_id("cmpl"), now(), engine.model_name
    prompt_tokens = sum(len(p) for p in prompts)
    echoes: list[str | None] = [None] * len(prompts)
    if req.echo:
        for i, prompt in enumerate(req.prompt):
            echoes[i] = prompt if isinstance(prompt, str) else tokenizer.decode(prompts[i], skip_special_tokens=False)
    texts = [ChoiceText(tokenizer, echoes[k // n], req.logprobs is not None) for k in range(len(choices))]
    deltas = serving.start(request_id, choices, req)

    if req.stream:
        include_usage = req.include_usage or req.continuous_usage

        def chunk(d: ChoiceDelta, usage: UsageInfo | None) -> str:
            text, logprobs = texts[d.index].add(d.text, d.logprobs, d.prompt_logprobs)
            c = CompletionChoice(index=d.index, text=text, logprobs=logprobs, finish_reason=d.finish_reason)
            body = CompletionStreamResponse(id=request_id, created=created, model=model, choices=[c], usage=usage)
            return dump_chunk(body, include_usage)

        def usage_chunk(usage: UsageInfo) -> str:
            return CompletionStreamResponse(
                id=request_id, created=created, model=model, choices=[], usage=usage
            ).model_dump_json()

        return serving.stream(deltas, len(choices), prompt_tokens, req, chunk, usage_chunk)

    result = await serving.complete(request, deltas, len(choices))
    if isinstance(result, Response):
        return result
    body = CompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=[
            CompletionChoice(index=k, text=text, logprobs=logprobs, finish_reason=result.finish_reasons[k])
            for k in range(len(choices))
            for text, logprobs in [texts[k].add(result.texts[k], result.logprobs[k], result.prompt_logprobs[k])]
        ],
        usage=UsageInfo.of(prompt_tokens, sum(result.num_tokens)),
    )
    return JSONResponse(body.model_dump())
