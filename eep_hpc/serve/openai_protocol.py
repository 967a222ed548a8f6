"""OpenAI request and response bodies for /v1/completions, /v1/chat/completions and /v1/models (pydantic v2).

Requests are validated strictly (a string is not an integer, 1 is not a boolean) and every field we cannot honour
is refused with a 400 that says so, rather than silently ignored. Fields OpenAI or vLLM define that do not change
the output (user, parallel_tool_calls, …) and unknown fields are accepted and ignored, like vLLM does.
Responses have exactly OpenAI's shapes.
"""

from __future__ import annotations

import os
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer, model_validator

MAX_N = 128  # choices per request
MAX_LOGPROBS = 20  # most likely tokens listed per position, as OpenAI allows
MAX_TOKEN_ID = 2**31 - 1
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


_random = bytearray()  # os.urandom's bytes, read 4 KiB at a time: a getrandom call per id cost a request's start ~2 us
os.register_at_fork(after_in_child=_random.clear)  # a forked child draws its own


def random_id(prefix: str) -> str:
    """`{prefix}-{uuid.uuid4().hex}`: 16 bytes of os.urandom with uuid4's version and variant bits, without a UUID
    object or a system call per id."""
    if len(_random) < 16:
        _random.extend(os.urandom(4096))  # in place: the one bytearray the fork hook clears
    b = _random[-16:]
    del _random[-16:]
    b[6] = b[6] & 0x0F | 0x40
    b[8] = b[8] & 0x3F | 0x80
    return f"{prefix}-{b.hex()}"


def now() -> int:
    return int(time.time())


# ---- requests -----------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM: usage in every chunk


class SamplingRequest(_Strict):
    """Fields /v1/completions and /v1/chat/completions share. None means "the default" everywhere."""

    model: str | None = None
    n: int | None = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1, le=MAX_TOKEN_ID)  # vLLM extension; -1 or 0 = off
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = Field(0, ge=0)
    include_stop_str_in_output: bool | None = False  # vLLM extension
    skip_special_tokens: bool | None = True  # vLLM extension
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float | None = Field(1.0, gt=0, allow_inf_nan=False)  # vLLM extension
    logit_bias: dict[str, float] | None = None
    # vLLM extensions not implemented here: refused when they would change the answer, not silently ignored
    min_p: float | None = None
    use_beam_search: bool | None = False
    user: str | None = None

    @field_validator("min_p", "use_beam_search")
    @classmethod
    def _not_implemented(cls, v: Any) -> Any:
        if v:
            raise ValueError("not supported")
        return v

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            if not all(isinstance(s, str) for s in v):
                raise ValueError("must be a string or a list of strings")
            return [s for s in v if s]  # an empty stop string would end every request at once
        return v

    @field_validator("stop_token_ids")
    @classmethod
    def _stop_token_ids(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and any(t < 0 or t > MAX_TOKEN_ID for t in v):
            raise ValueError("must be non-negative token ids")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("not supported")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        return 0 if v == -1 else v

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, v: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if v is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return v

    # -- resolved values ----------------------------------------------------------------------------------
    @property
    def num_choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def num_logprobs(self) -> int | None:
        """Most likely tokens to list per sampled token; None = no logprobs."""
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        """The same for prompt tokens (completions with echo); None = none."""
        return None


class CompletionRequest(SamplingRequest):
    # After validation: a non-empty list of prompts, each a string or a list of token ids.
    prompt: Any
    # Left out: OpenAI's default of 16; null: up to the context limit (vLLM's get_max_tokens does the same).
    max_tokens: int | None = Field(16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool | None = True

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        return normalize_prompt(v)

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("not supported")
        return v

    @model_validator(mode="after")
    def _best_of(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.num_choices:
            raise ValueError("best_of is not supported (it may only equal n)")
        return self


def _is_token_ids(v: Any) -> bool:
    return isinstance(v, list) and all(type(t) is int for t in v)


def normalize_prompt(v: Any) -> list[str | list[int]]:
    """str | list[int] | list[str] | list[list[int]] -> a non-empty list of prompts."""
    if isinstance(v, str):
        prompts: list = [v]
    elif _is_token_ids(v) and v:
        prompts = [v]
    elif isinstance(v, list) and v and (all(isinstance(p, str) for p in v) or all(_is_token_ids(p) for p in v)):
        prompts = v
    elif v == []:
        raise ValueError("must not be empty")
    else:
        raise ValueError(
            "must be a string, a list of strings, a list of token ids or a list of lists of token ids"
        )
    for p in prompts:
        if len(p) == 0:
            raise ValueError("must not be empty")
        if isinstance(p, list) and any(t < 0 or t > MAX_TOKEN_ID for t in p):
            raise ValueError("token ids must be non-negative")
    return prompts


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | None = None  # a list of text parts is joined into one string
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        if not isinstance(v, list):
            return v
        texts = []
        for i, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise ValueError(
                    f"content part {i} has type {kind!r}: only text parts ({{'type': 'text', 'text': ...}}) "
                    "are supported"
                )
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a {self.role} message needs content")
        return self

    def for_template(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class ResponseFormat(_Strict):
    type: Literal["text"]  # json_object / json_schema need guided decoding, which is not implemented


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)  # deprecated by OpenAI, still what most clients send
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    add_generation_prompt: bool | None = True
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = False  # the template already wrote the special tokens

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, v: int | None, info: ValidationInfo) -> int | None:
        if v is not None and not info.data.get("logprobs"):
            raise ValueError("only allowed when logprobs is true")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v: Any) -> Any:
        if v not in (None, "none"):
            raise ValueError("tool calling is not supported; tool_choice may only be 'none'")
        return v

    @field_validator("response_format", mode="before")
    @classmethod
    def _response_format(cls, v: Any) -> Any:
        if isinstance(v, dict) and v.get("type") not in (None, "text"):
            raise ValueError(f"response_format type {v.get('type')!r} is not supported (only 'text')")
        return v

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v: dict | None) -> dict | None:
        reserved = sorted(set(v or ()) & {"messages", "tools", "add_generation_prompt", "conversation"})
        if reserved:
            raise ValueError(f"may not set {', '.join(reserved)}; use the request fields")
        return v

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses ----------------------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "UsageInfo":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy logprobs: per token its text, logprob (None for the first prompt token), a dict of the most
    likely tokens (the chosen one included, as vLLM does) and the offset of its text in the choice's text."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(BaseModel):
    content: list[ChatLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    tool_calls: list = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _only_set(self) -> dict[str, Any]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionStreamResponse(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "eep-hpc"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
