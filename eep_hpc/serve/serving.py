"""What the OpenAI routes share: parsing a body, admitting a request (model, readiness), running its choices
with or without streaming, and the usage figures."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from eep_hpc.serve.engine_client import EngineClient
from eep_hpc.serve.errors import ApiError, error_body, internal_error, model_not_found, not_ready, validation_error
from eep_hpc.serve.generation import (
    Choice,
    ChoiceDelta,
    Collected,
    TextOptions,
    collect,
    start_choices,
)
from eep_hpc.serve.metrics import ApiMetrics
from eep_hpc.serve.openai_protocol import SamplingRequest, UsageInfo
from eep_hpc.serve.sse import DONE, ClientDisconnected, EventStreamResponse, event, unless_disconnected

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=BaseModel)

CLIENT_CLOSED = 499  # nginx's code for "the client went away before the answer"


@dataclass
class Serving:
    engine: EngineClient
    metrics: ApiMetrics

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

    def start(self, request_id: str, choices: list[Choice], req: SamplingRequest) -> AsyncIterator[ChoiceDelta]:
        options = TextOptions(
            stop=list(req.stop or []),
            include_stop_str_in_output=bool(req.include_stop_str_in_output),
            skip_special_tokens=req.skip_special_tokens is not False,
        )
        return start_choices(self.engine, self.metrics, request_id, choices, options, time.monotonic())

    async def complete(
        self, request: Request, deltas: AsyncIterator[ChoiceDelta], num_choices: int
    ) -> Collected | Response:
        """Whole texts, or the response to send instead (client gone, engine error)."""
        try:
            result = await unless_disconnected(request, collect(deltas, num_choices))
        except ClientDisconnected:
            return Response(status_code=CLIENT_CLOSED)
        if result.error:
            raise internal_error(f"Generation failed: {result.error}")
        return result

    def stream(
        self,
        deltas: AsyncIterator[ChoiceDelta],
        num_choices: int,
        prompt_tokens: int,
        req: SamplingRequest,
        chunk: Callable[[ChoiceDelta, UsageInfo | None], str],
        usage_chunk: Callable[[UsageInfo], str],
        first: tuple[str, ...] = (),
    ) -> EventStreamResponse:
        """SSE: `first` events, a chunk per delta, the usage chunk if asked for, then [DONE]. An engine error
        ends the stream with an error event; closing the stream closes the deltas (aborting the requests)."""
        include_usage, continuous = req.include_usage, req.continuous_usage

        async def events() -> AsyncIterator[bytes]:
            tokens = [0] * num_choices
            try:
                for e in first:
                    yield event(e)
                async for d in deltas:
                    tokens[d.index] = d.num_tokens
                    if d.finish_reason == "error":
                        yield event(internal_error(f"Generation failed: {d.error or 'engine error'}").body())
                        break
                    if d.text or d.logprobs or d.prompt_logprobs or d.finish_reason is not None:
                        usage = UsageInfo.of(prompt_tokens, sum(tokens)) if continuous else None
                        yield event(chunk(d, usage))
                else:
                    if include_usage:
                        yield event(usage_chunk(UsageInfo.of(prompt_tokens, sum(tokens))))
            except Exception:
                logger.exception("stream failed")
                yield event(error_body("Internal server error.", "InternalServerError", None, 500))
            finally:
                await deltas.aclose()  # type: ignore[attr-defined]
            yield DONE

        return EventStreamResponse(events())


def dump_chunk(chunk: BaseModel, include_usage: bool) -> str:
    """OpenAI's chunks carry "usage": null until the last one when usage was asked for, and no usage key else."""
    return chunk.model_dump_json() if include_usage else chunk.model_dump_json(exclude={"usage"})
