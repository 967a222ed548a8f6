"""The one way of an OpenAI request through serve/, for /v1/completions and /v1/chat/completions alike:

    parse      the body into the endpoint's request model (a 400 naming the field), then admit it: the model
               name (404) and readiness (503)
    prepare    the endpoint turns it into engine choices, prompt token ids and SamplingParams, with every check
               that needs the engine done once (prompts.py; a 400)
    generate   one engine request per choice, detokenized, stop strings applied (generation.py)
    respond    SSE chunks as the deltas come (stream=true), else the whole texts in one JSON body

What differs between the two endpoints, how prompts become token ids and how a choice reads in a chunk or in the
whole body, is an `Endpoint`: chat.py's ChatCompletion, completions.py's Completion. Everything else is here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from json.encoder import encode_basestring  # json.dumps(text, ensure_ascii=False) without a JSONEncoder per call
from typing import AsyncIterator, ClassVar, Protocol, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.errors import (ApiError, ended_with_error, error_body, model_not_found, not_ready,
                                  validation_error)
from eep_hpc.serve.generation import ChoiceDelta, TextOptions, collect, generate
from eep_hpc.serve.metrics import ApiMetrics
from eep_hpc.serve.openai_protocol import SamplingRequest, UsageInfo, now, random_id
from eep_hpc.serve.prompts import Choice
from eep_hpc.serve.sse import (DONE, ClientDisconnected, DirectLane, EventStreamResponse, Write, event,
                               unless_disconnected)
from eep_hpc.serve.write_log import WriteLog

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)
E = TypeVar("E", bound="Endpoint")

TEXT_SLOT = "eep-hpc:text-slot"  # a placeholder text, found once in a rendered chunk
CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


class Endpoint(Protocol):
    """One request of an endpoint, validated: its engine choices and how their output reads."""

    request_type: ClassVar[type[SamplingRequest]]
    id_prefix: ClassVar[str]  # response ids are "<prefix>-<random hex>"
    chunk_type: ClassVar[type[BaseModel]]  # a streamed chunk: id, created, model, choices, usage
    body_type: ClassVar[type[BaseModel]]  # the whole response: id, created, model, choices, usage

    choices: list[Choice]  # the engine requests, in response order
    prompt_tokens: int  # for usage

    @classmethod
    async def prepare(cls: type[E], req: SamplingRequest, engine: EngineClient) -> E:
        """Prompts to token ids, and every check that needs the engine (ApiError on failure)."""
        ...

    def first_choices(self) -> list[BaseModel]:
        """Chunk choices a stream starts with, before any text (chat: each choice's role)."""
        ...

    def stream_choice(self, d: ChoiceDelta) -> BaseModel:
        """A chunk's choice for a delta."""
        ...

    def whole_choice(self, c: ChoiceDelta) -> BaseModel:
        """The response's choice for a choice's whole output."""
        ...

    def plain_text(self, index: int) -> bool:
        """Whether a chunk of this choice that carries only text (no logprobs, not finishing) reads the same at
        every token but for the text, and making it has no side effect (then it is framed from a template). Once
        True for a choice, it stays True (completions: false until the echo went out with the first chunk)."""
        ...


@dataclass
class Serving:
    engine: EngineClient
    metrics: ApiMetrics
    write_log: WriteLog | None = None  # serve.write_log: when each streamed token was sent (benchmarks)

    async def handle(self, request: Request, endpoint: type[Endpoint]) -> Response:
        req = await self.parse(request, endpoint.request_type)
        api = await endpoint.prepare(req, self.engine)
        reply = Reply(random_id(endpoint.id_prefix), now(), self.engine.model_name, api)
        # A stream of one choice without per-chunk usage may have its text-only chunks written where its tokens
        # arrive (sse.DirectLane; generation.py says which outputs).
        lane = DirectLane() if req.stream and len(api.choices) == 1 and not req.continuous_usage else None
        deltas = generate(self.engine, self.metrics, reply.id, api.choices, TextOptions.of(req), lane)
        if req.stream:
            return reply.stream(deltas, req, self.write_log, lane)
        return await reply.collect(request, deltas)

    async def parse(self, request: Request, cls: type[R]) -> R:
        try:
            body = await request.body()
        except ClientDisconnect:  # nobody is left to read the answer; not a server error
            message = "The client closed the connection before the request body was complete."
            raise ApiError(CLIENT_CLOSED, message) from None
        try:
            req = cls.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e.errors(include_url=False), body) from None
        model = getattr(req, "model", None)
        if model and model != self.engine.model_name:
            raise model_not_found(model)
        if not self.engine.ready():
            raise not_ready()
        return req


@dataclass
class Reply:
    """The response to one request: its id, creation time and model, and the endpoint's choice layout."""

    id: str
    created: int
    model: str
    api: Endpoint

    def body(self, choices: list[BaseModel], usage: UsageInfo | None, whole: bool = False) -> BaseModel:
        cls = self.api.body_type if whole else self.api.chunk_type
        return cls(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def stream(self, deltas: AsyncIterator[ChoiceDelta], req: SamplingRequest,
               write_log: WriteLog | None = None, lane: DirectLane | None = None) -> EventStreamResponse:
        """SSE: the endpoint's first chunks, a chunk per delta, the usage chunk if asked for, then [DONE]. An engine
        error ends the stream with an error event; however the stream ends (cancelled too: the client left), the
        deltas are closed (aborting the requests). `lane` (one choice, no continuous usage): given the text
        template of choice 0 once there is one, it writes the chunks of text-only deltas itself, the same bytes."""
        include_usage, continuous = req.include_usage, req.continuous_usage
        prompt_tokens, num_choices = self.api.prompt_tokens, len(self.api.choices)

        def chunk(choice: BaseModel | None, usage: UsageInfo | None) -> bytes:
            body = self.body([choice] if choice is not None else [], usage)
            # OpenAI's chunks carry "usage": null until the last one when usage was asked for, and no key else.
            return event(body.model_dump_json(exclude=None if include_usage or continuous else {"usage"}))

        # Per choice, once its chunks read the same at every token but for the text (Endpoint.plain_text): the
        # chunk of a delta that only carries text, before and after its text. Such a chunk is framed from these: the
        # same bytes `chunk` makes, without building and serialising its models for every token (the text goes in
        # as json.dumps(text, ensure_ascii=False) writes it, quotes included).
        templates: list[tuple[bytes, bytes] | None] = [None] * num_choices

        def text_template(index: int) -> tuple[bytes, bytes] | None:
            """The choice's template, made from a placeholder text the first time its chunks are plain."""
            if continuous or not self.api.plain_text(index):
                return None
            rendered = chunk(self.api.stream_choice(ChoiceDelta(index, TEXT_SLOT, 0)), None)
            before, _, after = rendered.partition(b'"' + TEXT_SLOT.encode() + b'"')
            templates[index] = (before, after)
            return before, after

        async def events(write: Write) -> None:
            tokens = [0] * num_choices
            writes = write_log.stream(self.id, num_choices) if write_log is not None else None
            if lane is not None and writes is not None:
                lane.written = writes.written
            try:
                for c in self.api.first_choices():
                    await write(chunk(c, UsageInfo.of(prompt_tokens, 0) if continuous else None))
                if lane is not None:  # completions with echo: plain once the echo went out (below)
                    lane.template = text_template(0)
                async for d in deltas:
                    tokens[d.index] = d.num_tokens
                    if (d.finish_reason is None and d.text and not d.logprobs and not d.prompt_logprobs
                            and (template := templates[d.index] or text_template(d.index)) is not None):
                        await write(template[0] + encode_basestring(d.text).encode() + template[1])
                    elif (d.finish_reason is not None
                          and (failed := ended_with_error(d.finish_reason, d.error)) is not None):
                        await write(event(failed.body()))  # an engine failure, or the server shutting down
                        break
                    elif d.text or d.logprobs or d.prompt_logprobs or d.finish_reason is not None:
                        usage = UsageInfo.of(prompt_tokens, sum(tokens)) if continuous else None
                        await write(chunk(self.api.stream_choice(d), usage))
                    else:
                        continue
                    if writes is not None:  # the chunk has been handed to the socket
                        writes.written(d.index, d.num_tokens)
                    if lane is not None and lane.template is None:
                        lane.template = text_template(0)
                else:
                    if include_usage:
                        await write(chunk(None, UsageInfo.of(prompt_tokens, sum(tokens))))
            except Exception:  # a bug here, or (not from uvicorn, which drops writes to a gone client) a failed write
                logger.exception("stream failed")
                await write(event(error_body("Internal server error.", "InternalServerError", None, 500)))
            finally:
                if writes is not None:
                    writes.close()
                await deltas.aclose()  # type: ignore[attr-defined]
            await write(DONE)

        return EventStreamResponse(events, lane)

    async def collect(self, request: Request, deltas: AsyncIterator[ChoiceDelta]) -> Response:
        """The whole texts in one body; 499 when the client left first, 500 on an engine error."""
        try:
            result = await unless_disconnected(request, collect(deltas, len(self.api.choices)))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        if result.error:
            raise ended_with_error(result.finish_reason, result.error)
        completion_tokens = sum(c.num_tokens for c in result.choices)
        choices = [self.api.whole_choice(c) for c in result.choices]
        body = self.body(choices, UsageInfo.of(self.api.prompt_tokens, completion_tokens), whole=True)
        return JSONResponse(body.model_dump())
