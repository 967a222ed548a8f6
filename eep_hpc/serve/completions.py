"""POST /v1/completions: prompts (text or token ids, batched) x n choices, streaming or not."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from eep_hpc.serve.generation import (
    Choice,
    ChoiceDelta,
    check_token_ids,
    off_loop,
    resolve_max_tokens,
    sampling_params,
    vocab_size,
)
from eep_hpc.serve.openai_protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    now,
    random_id,
)
from eep_hpc.serve.serving import Serving, dump_chunk


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
    deltas = serving.start(request_id, choices, req)

    if req.stream:
        include_usage = req.include_usage or req.continuous_usage

        def chunk(d: ChoiceDelta, usage: UsageInfo | None) -> str:
            c = CompletionChoice(index=d.index, text=d.text, finish_reason=d.finish_reason)
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
            CompletionChoice(index=k, text=result.texts[k], finish_reason=result.finish_reasons[k])
            for k in range(len(choices))
        ],
        usage=UsageInfo.of(prompt_tokens, sum(result.num_tokens)),
    )
    return JSONResponse(body.model_dump())
