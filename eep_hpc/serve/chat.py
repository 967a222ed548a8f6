"""POST /v1/chat/completions: the messages rendered by the model's chat template into one prompt, n choices; each
streamed choice starts with the assistant role. The way of the request is serving.py's."""

from __future__ import annotations

from typing import Any

from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.errors import bad_request
from eep_hpc.serve.generation import ChoiceDelta
from eep_hpc.serve.logprobs import TokenLogprob, clamp_logprob, token_piece
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
)
from eep_hpc.serve.prompts import Choice, off_loop, prompt_choices, tokenize


class ChatCompletion:
    """One /v1/chat/completions request, validated (serving.Endpoint): n choices of one rendered prompt."""

    request_type = ChatCompletionRequest
    id_prefix = "chatcmpl"
    chunk_type = ChatCompletionStreamResponse
    body_type = ChatCompletionResponse

    def __init__(self, tokenizer: Any, choices: list[Choice], prompt_tokens: int, logprobs: bool) -> None:
        self.tokenizer, self.choices, self.prompt_tokens, self.logprobs = tokenizer, choices, prompt_tokens, logprobs

    @classmethod
    async def prepare(cls, req: ChatCompletionRequest, engine: EngineClient) -> "ChatCompletion":
        size = sum(len(m.content or "") for m in req.messages)
        text = await off_loop(size, render_prompt, engine, req)
        ids = await tokenize(engine, text, add_special_tokens=req.add_special_tokens is True)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        choices = prompt_choices(engine, req, ids, req.requested_max_tokens, 0, "messages", param)
        return cls(engine.tokenizer, choices, len(ids), req.num_logprobs is not None)

    def first_choices(self) -> list[ChatStreamChoice]:
        role = DeltaMessage(role="assistant", content="")
        return [ChatStreamChoice(index=c.index, delta=role) for c in self.choices]

    def stream_choice(self, d: ChoiceDelta) -> ChatStreamChoice:
        delta = DeltaMessage(content=d.text) if d.text else DeltaMessage()
        return ChatStreamChoice(index=d.index, delta=delta, logprobs=self._logprobs(d), finish_reason=d.finish_reason)

    def whole_choice(self, c: ChoiceDelta) -> ChatChoice:
        message = AssistantMessage(content=c.text)
        return ChatChoice(index=c.index, message=message, logprobs=self._logprobs(c), finish_reason=c.finish_reason)

    def plain_text(self, index: int) -> bool:
        return not self.logprobs

    def _logprobs(self, d: ChoiceDelta) -> ChatChoiceLogprobs | None:
        return chat_logprobs(self.tokenizer, d.logprobs) if self.logprobs else None


def render_prompt(engine: EngineClient, req: ChatCompletionRequest) -> str:
    messages = [m.for_template() for m in req.messages]
    try:
        return engine.tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=req.add_generation_prompt is not False,
            tools=req.tools,
            **(req.chat_template_kwargs or {}),
        )
    except ValueError as e:
        raise bad_request(f"Cannot apply the chat template to these messages: {e}", "messages") from None


def chat_logprobs(tokenizer: Any, entries: list[TokenLogprob]) -> ChatChoiceLogprobs:
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
