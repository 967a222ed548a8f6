"""OpenAI-style errors: every failure, whatever its cause, reaches the client as
`{"error": {"message", "type", "param", "code"}}` with a 4xx/5xx status, never as a bare 500 page."""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger(__name__)

INVALID_REQUEST = "invalid_request_error"


class ApiError(Exception):
    """An error answered to the client as it is; raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def model_not_found(model: str) -> ApiError:
    return ApiError(404, f"The model `{model}` does not exist.", INVALID_REQUEST, "model", "model_not_found")


def not_ready() -> ApiError:
    return ApiError(503, "The engine is not ready to serve requests.", "ServiceUnavailableError", None, 503)


def internal_error(message: str = "Internal server error.") -> ApiError:
    return ApiError(500, message, "InternalServerError", None, 500)


def ended_with_error(finish_reason: str | None, error: str) -> ApiError | None:
    """What a client is told of a request the server could not finish, if this output ends it so: an engine
    failure ("error") is a 500; a request the server ended ("abort" with a reason: it is shutting down) a 503.
    None for a normal end (a plain "abort" is the client's own, who is gone)."""
    if finish_reason == "error":
        return internal_error(f"Generation failed: {error or 'engine error'}")
    if finish_reason == "abort" and error:
        return ApiError(503, error, "ServiceUnavailableError", None, 503)
    return None


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, INVALID_REQUEST, None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})


# ---- validation errors -> 400 naming the field --------------------------------------------------------------


def _param(loc: tuple) -> str | None:
    """('messages', 0, 'role') -> 'messages[0].role'; FastAPI's leading 'body' is dropped."""
    parts = list(loc[1:] if loc and loc[0] == "body" else loc)
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += f".{p}" if out else str(p)
    return out or None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def validation_error(errors: list[dict], body: bytes | None = None) -> ApiError:
    """One 400 from pydantic's error list: the first error names the param, the message lists them all.
    `body`, when given, is the raw request body (to tell a body that is not UTF-8 from one that is not JSON)."""
    if errors and errors[0].get("type") == "json_invalid":
        detail = errors[0].get("ctx", {}).get("error") or errors[0].get("msg", "")
        try:
            (body or b"").decode("utf-8")
        except UnicodeDecodeError as e:  # e.g. Latin-1 text; JSON must be UTF-8 (RFC 8259)
            detail = f"it is not valid UTF-8 ({e.reason} at byte {e.start})"
        return bad_request(f"Invalid JSON in request body: {detail}")
    messages = []
    for e in errors[:5]:
        param = _param(tuple(e.get("loc", ())))
        msg = e.get("msg", "invalid value")
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        where = f"{param}: " if param else "request body: "
        # A missing field has no "got", and the whole body is no useful one.
        shown = param is not None and e.get("type") != "missing" and "input" in e
        got = f" (got {_short(e['input'])})" if shown else ""
        messages.append(f"{where}{msg}{got}")
    if len(errors) > 5:
        messages.append(f"and {len(errors) - 5} more errors")
    first = _param(tuple(errors[0].get("loc", ()))) if errors else None
    return bad_request("; ".join(messages) or "Invalid request.", first)


# ---- wiring into the app ------------------------------------------------------------------------------------


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, (RequestValidationError, ValidationError))
    return validation_error(list(exc.errors())).response()


async def _on_http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    where = f"{request.method} {request.url.path}"
    if status == 404:
        message, code = f"Invalid URL ({where}): no such route.", "not_found"
    elif status == 405:
        message, code = f"Method not allowed ({where}).", "method_not_allowed"
    else:
        message, code = str(exc.detail), status
    type_ = INVALID_REQUEST if status < 500 else "InternalServerError"
    return JSONResponse(error_body(message, type_, None, code), status_code=status, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(ValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_exception)
    app.add_middleware(CatchAllMiddleware)


class CatchAllMiddleware:
    """Turns any exception no handler took into a logged 500 with a JSON body (before the response started)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        def send_tracking(message: Message) -> Awaitable[None]:  # no coroutine of its own per streamed chunk
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            return send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            await self.failed(scope, send, started)

    @staticmethod
    async def failed(scope: Scope, send: Send, started: bool) -> None:
        """What an exception no handler took becomes (called in its `except`; app.App's hot routes call it too)."""
        logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
        if started:
            return  # the body cannot be replaced any more; the server closes the connection
        body = json.dumps(internal_error().body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 500,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
