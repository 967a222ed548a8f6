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
from typing import AsyncIterator, Callable, ClassVar, Protocol, TypeVar

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
from eep_hpc.serve.sse import (DONE, ClientDisconnected, DirectLane, End, EventStreamResponse, Write, event,
                               unless_disconnected)
from eep_hpc.serve.write_log import WriteLog

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)
E = TypeVar("E", bound="Endpoint")

TEXT_SLOT = "eep-hpc:text-slot"  # a placeholder text, found once in a rendered chunk
FINISH_SLOT = "eep-hpc:finish-slot"  # a placeholder finish reason
ID_SLOT = "eep-hpc:id-slot"  # a placeholder response id
CREATED_SLOT = 4_102_444_799_987  # a placeholder creation time (no real one: the year 131,970)
_SLOTS = (b'"' + ID_SLOT.encode() + b'"', str(CREATED_SLOT).encode())
MAX_CACHED_INDEX = 128  # chunk shapes of choices 0..127 are kept (per endpoint, model, kind), others made per request

# A streamed chunk's shape (Reply.cut): the chunk rendered once with placeholders for the response's id, creation
# time, text and finish reason, cut at them, by (endpoint, model, usage key shown, kind, choice index). None: the
# placeholders were not each found once in order, and such chunks are made by pydantic every time.
_shapes: dict[tuple, list[bytes] | None] = {}
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
        """Whether a chunk of this choice that carries only text (no logprobs), or text and a finish reason, reads
        the same at every token but for the text and finish reason, and making it has no side effect; and reads the
        same in every request of the endpoint but for the response's id, creation time and model (then it is framed
        from a template: Reply.cut). Once True for a choice, it stays True (completions: false until the echo went
        out with the first chunk)."""
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
            body = await read_body(request)
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


async def read_body(request: Request) -> bytes:
    """request.body(), without the async generator it reads through (each one's first step is registered with the
    event loop, and closed through `aclosing`): the body's messages read here, the result kept where body() keeps it."""
    if hasattr(request, "_body"):
        return request._body
    receive, chunks = request.receive, []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()
    body = request._body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    return body


_TEXT, _FINISH = b'"' + TEXT_SLOT.encode() + b'"', b'"' + FINISH_SLOT.encode() + b'"'


def _cut(rendered: bytes, slots: tuple[bytes, ...]) -> list[bytes] | None:
    """`rendered` cut at each slot in turn, or None unless each is found exactly once, after the one before."""
    pieces = [rendered]
    for slot in slots:
        rest = pieces.pop()
        if rendered.count(slot) != 1 or rest.count(slot) != 1:
            return None
        before, _, after = rest.partition(slot)
        pieces += [before, after]
    return pieces


@dataclass
class Reply:
    """The response to one request: its id, creation time and model, and the endpoint's choice layout."""

    id: str
    created: int
    model: str
    api: Endpoint
    _head: tuple[bytes, bytes] | None = None  # the id (JSON) and creation time, as they read in a chunk

    def body(self, choices: list[BaseModel], usage: UsageInfo | None, whole: bool = False) -> BaseModel:
        cls = self.api.body_type if whole else self.api.chunk_type
        return cls(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)

    def cut(self, key: tuple, index: int, choice: Callable[[], BaseModel], exclude: set[str] | None,
            slots: tuple[bytes, ...]) -> list[bytes] | None:
        """The chunk (SSE event) of `choice()` and no usage, cut at `slots` (its placeholders, in order), with this
        response's id and creation time in its first piece: `pieces[0] + slot 0's value + pieces[1] + ...` is the
        chunk pydantic makes. The shape is made once per endpoint, model, `exclude` and `key` (and choice index, for
        the first MAX_CACHED_INDEX choices), so a request's chunks are made without pydantic. None: not cuttable."""
        shape_key = (type(self.api), self.model, exclude is None, key, index)
        shape = _shapes.get(shape_key, False) if index < MAX_CACHED_INDEX else False
        if shape is False:
            body = self.api.chunk_type(id=ID_SLOT, created=CREATED_SLOT, model=self.model, choices=[choice()],
                                       usage=None)
            shape = _cut(event(body.model_dump_json(exclude=exclude)), _SLOTS + slots)
            if index < MAX_CACHED_INDEX:
                _shapes[shape_key] = shape
        if shape is None:
            return None
        head = self._head
        if head is None:
            head = self._head = (encode_basestring(self.id).encode(), str(self.created).encode())
        return [shape[0] + head[0] + shape[1] + head[1] + shape[2], *shape[3:]]

    def stream(self, deltas: AsyncIterator[ChoiceDelta], req: SamplingRequest,
               write_log: WriteLog | None = None, lane: DirectLane | None = None) -> EventStreamResponse:
        """SSE: the endpoint's first chunks, a chunk per delta, the usage chunk if asked for, then [DONE]. An engine
        error ends the stream with an error event; however the stream ends (cancelled too: the client left), the
        deltas are closed (aborting the requests). `lane` (one choice, no continuous usage): given the text
        template of choice 0 once there is one, it writes the chunks of text-only deltas itself, the same bytes."""
        include_usage, continuous = req.include_usage, req.continuous_usage
        prompt_tokens, num_choices = self.api.prompt_tokens, len(self.api.choices)
        # OpenAI's chunks carry "usage": null until the last one when usage was asked for, and no key else.
        exclude = None if include_usage or continuous else {"usage"}

        def chunk(choice: BaseModel | None, usage: UsageInfo | None) -> bytes:
            body = self.body([choice] if choice is not None else [], usage)
            return event(body.model_dump_json(exclude=exclude))

        # Per choice, once its chunks read the same at every token but for the text (Endpoint.plain_text): the
        # chunk of a delta that only carries text, before and after its text. Such a chunk is framed from these: the
        # same bytes `chunk` makes, without building and serialising its models for every token (the text goes in
        # as json.dumps(text, ensure_ascii=False) writes it, quotes included).
        templates: list[tuple[bytes, bytes] | None] = [None] * num_choices

        def text_template(index: int) -> tuple[bytes, bytes] | None:
            """The choice's template, made from a placeholder text the first time its chunks are plain."""
            if continuous or not self.api.plain_text(index):
                return None
            pieces = self.cut(("text",), index, lambda: self.api.stream_choice(ChoiceDelta(index, TEXT_SLOT, 0)),
                              exclude, (_TEXT,))
            if pieces is None:
                return None
            templates[index] = before_after = (pieces[0], pieces[1])
            return before_after

        def finish_chunk(d: ChoiceDelta) -> bytes | None:
            """The chunk of a plain choice's last delta (text, if any, and a finish reason), from its shape."""
            if continuous or not self.api.plain_text(d.index):
                return None
            if d.text:
                pieces = self.cut(("finish", True), d.index,
                                  lambda: self.api.stream_choice(ChoiceDelta(d.index, TEXT_SLOT, 0, FINISH_SLOT)),
                                  exclude, (_TEXT, _FINISH))
                if pieces is None:
                    return None
                return (pieces[0] + encode_basestring(d.text).encode() + pieces[1]
                        + encode_basestring(d.finish_reason).encode() + pieces[2])
            pieces = self.cut(("finish", False), d.index,
                              lambda: self.api.stream_choice(ChoiceDelta(d.index, "", 0, FINISH_SLOT)),
                              exclude, (_FINISH,))
            if pieces is None:
                return None
            return pieces[0] + encode_basestring(d.finish_reason).encode() + pieces[1]

        async def events(write: Write, end: End) -> None:
            tokens = [0] * num_choices
            unfinished = num_choices
            # The stream's last events (the finish of the last choice to finish, usage, an error; then [DONE]): they
            # come with no wait between them and go out together with the body's end (sse.EventStreamResponse).
            group: list[bytes] = []
            held: tuple[int, int] | None = None  # (choice, its tokens) of the finish chunk in `group`
            writes = write_log.stream(self.id, num_choices) if write_log is not None else None
            if lane is not None and writes is not None:
                lane.written = writes.written
            try:
                try:
                    for c in self.api.first_choices():
                        first = None if continuous else self.cut(("first",), c.index, lambda: c, exclude, ())
                        await write(first[0] if first is not None
                                    else chunk(c, UsageInfo.of(prompt_tokens, 0) if continuous else None))
                    if lane is not None:  # completions with echo: plain once the echo went out (below)
                        lane.template = text_template(0)
                    async for d in deltas:
                        tokens[d.index] = d.num_tokens
                        if (d.finish_reason is None and d.text and not d.logprobs and not d.prompt_logprobs
                                and (template := templates[d.index] or text_template(d.index)) is not None):
                            body = template[0] + encode_basestring(d.text).encode() + template[1]
                        elif (d.finish_reason is not None
                              and (failed := ended_with_error(d.finish_reason, d.error)) is not None):
                            group.append(event(failed.body()))  # an engine failure, or the server shutting down
                            break
                        elif (d.finish_reason is not None and not d.logprobs and not d.prompt_logprobs
                              and (last := finish_chunk(d)) is not None):
                            body = last
                        elif d.text or d.logprobs or d.prompt_logprobs or d.finish_reason is not None:
                            usage = UsageInfo.of(prompt_tokens, sum(tokens)) if continuous else None
                            body = chunk(self.api.stream_choice(d), usage)
                        else:
                            continue
                        if d.finish_reason is not None:
                            unfinished -= 1
                            if not unfinished:  # the stream's last chunk (the usage, if any, comes at once)
                                group.append(body)
                                held = (d.index, d.num_tokens)
                                continue
                        await write(body)
                        if writes is not None:  # the chunk has been handed to the socket
                            writes.written(d.index, d.num_tokens)
                        if lane is not None and lane.template is None:
                            lane.template = text_template(0)
                    else:
                        if include_usage:
                            group.append(chunk(None, UsageInfo.of(prompt_tokens, sum(tokens))))
                except Exception:  # a bug here, or (not from uvicorn: it drops writes to a gone client) a failed write
                    logger.exception("stream failed")
                    group.append(event(error_body("Internal server error.", "InternalServerError", None, 500)))
                finally:
                    await deltas.aclose()  # type: ignore[attr-defined]
                group.append(DONE)
                await end(group)
                if writes is not None and held is not None:
                    writes.written(*held)
            finally:
                if writes is not None:
                    writes.close()

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
