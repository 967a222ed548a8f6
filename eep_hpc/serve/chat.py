"""POST /v1/chat/completions: messages rendered by the model's chat template, n choices, streaming or not."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from eep_hpc.serve.errors import bad_request
from eep_hpc.serve.generation import (
    Choice,
    ChoiceDelta,
    TokenLogprob,
    clamp_logprob,
    off_loop,
    resolve_max_tokens,
    sampling_params,
    token_piece,
)
from eep_hpc.serve.openai_protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChoiceLogprobs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatStreamChoice,
    DeltaMessage,
    TopLogprob,
    UsageInfo,
    now,
    random_id,
)
from eep_hpc.serve.serving import Serving, dump_chunk


def render_prompt(serving: Serving, req: ChatCompletionRequest) -> str:
    messages = [m.for_template() for m in req.messages]
    try:
        return serving.engine.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=req.add_generation_prompt is not False,
            tools=req.tools,
            **(req.chat_template_kwargs or {}),
        )
    except ValueError as e:
        raise bad_request(f"Cannot apply the chat template to these messages: {e}", "messages") from None


def chat_logprobs(tokenizer, entries: list[TokenLogprob]) -> ChatChoiceLogprobs:
    """OpenAI's chat logprobs: per token its text, logprob, UTF-8 bytes and the top_logprobs most likely tokens."""
    content = []
    for e in entries:
        text, raw = token_piece(tokenizer, e.token_id)
        top = []
        for t, v in e.top:
            t_text, t_raw = token_piece(tokenizer, t)
            top.append(TopLogprob(token=t_text, logprob=clamp_logprob(v), bytes=list(t_raw)))
        content.append(ChatLogprob(token=text, logprob=clamp_logprob(e.logprob), bytes=list(raw), top_logprobs=top))
    return ChatChoiceLogprobs(content=content)


async def create_chat_completion(serving: Serving, request: Request) -> Response:
    req = await serving.parse(request, ChatCompletionRequest)
    engine = serving.engine
    size = sum(len(m.content or "") for m in req.messages)
    text = await off_loop(size, render_prompt, serving, req)
    ids = await off_loop(len(text), engine.tokenizer.encode, text, add_special_tokens=req.add_special_tokens is True)
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    max_tokens = resolve_max_tokens(len(ids), req.requested_max_tokens, engine.max_model_len, "messages", param)
    n = req.num_choices
    choices = [Choice(j, ids, sampling_params(req, max_tokens, j)) for j in range(n)]

    request_id, created, model = random_id("chatcmpl"), now(), engine.model_name
    deltas = serving.start(request_id, choices, req)
    want_logprobs = req.num_logprobs is not None

    if req.stream:
        include_usage = req.include_usage or req.continuous_usage

        def chunk(d: ChoiceDelta, usage: UsageInfo | None) -> str:
            delta = DeltaMessage(content=d.text) if d.text else DeltaMessage()
            logprobs = chat_logprobs(engine.tokenizer, d.logprobs) if want_logprobs else None
            c = ChatStreamChoice(index=d.index, delta=delta, logprobs=logprobs, finish_reason=d.finish_reason)
            body = ChatCompletionStreamResponse(id=request_id, created=created, model=model, choices=[c], usage=usage)
            return dump_chunk(body, include_usage)

        def usage_chunk(usage: UsageInfo) -> str:
            return ChatCompletionStreamResponse(
                id=request_id, created=created, model=model, choices=[], usage=usage
            ).model_dump_json()

        # Every choice starts with the assistant role, as OpenAI's streams do.
        first = tuple(
            dump_chunk(
                ChatCompletionStreamResponse(
                    id=request_id,
                    created=created,
                    model=model,
                    choices=[ChatStreamChoice(index=j, delta=DeltaMessage(role="assistant", content=""))],
                    usage=UsageInfo.of(len(ids), 0) if req.continuous_usage else None,
                ),
                include_usage,
            )
            for j in range(n)
        )
        return serving.stream(deltas, n, len(ids), req, chunk, usage_chunk, first)

    result = await serving.complete(request, deltas, n)
    if isinstance(result, Response):
        return result
    body = ChatCompletionResponse(
        id=request_id,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                index=j,
                message=AssistantMessage(content=result.texts[j]),
                logprobs=chat_logprobs(engine.tokenizer, result.logprobs[j]) if want_logprobs else None,
                finish_reason=result.finish_reasons[j],
            )
            for j in range(n)
        ],
        usage=UsageInfo.of(len(ids), sum(result.num_tokens)),
    )
    return JSONResponse(body.model_dump())
