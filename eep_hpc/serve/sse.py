"""Server-sent events and client disconnects.

Whatever way a response ends (finished, client gone, server shutting down), the iterator that produced it is
closed, so the engine requests behind it are aborted and their KV blocks freed.

`EventStreamResponse` is the per-token path of every stream, so it does as little per chunk as it can: it writes
each chunk with the server's own `send` (set in the scope by `app.App`, the outermost ASGI layer), not through the
send wrappers of the middleware stack, which only look at the start message (status, "response started"); the start
goes through them as usual. So no middleware that rewrites response bodies (e.g. GZip) may be added to the app. The
events come from a coroutine that writes each one (`await write(chunk)`), one layer less per token than an async
generator iterated by a loop that sends. As in Starlette's StreamingResponse, they go out from a task of their own
while the request's task waits for the client's disconnect and then cancels that task: the cancellation is raised
where the coroutine waits (for its next delta, or in a write), so its `finally` closes what it iterates, and the
response waits for that (shielded from a cancellation of its own).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, TypeVar

import anyio
from fastapi import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


def event(payload: str | bytes | dict[str, Any]) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload, ensure_ascii=False)
    if isinstance(payload, str):
        payload = payload.encode()
    return b"data: " + payload + b"\n\n"


SERVER_SEND = "eep_hpc.server_send"  # scope key: the send the server gave the app, before any middleware


Write = Callable[[bytes], Awaitable[None]]  # sends one chunk of the body


class EventStreamResponse(Response):
    """text/event-stream from `events(write)`, a coroutine that writes each event as it is ready (one `send` each);
    see the module's docstring."""

    media_type = "text/event-stream"

    def __init__(self, events: Callable[[Write], Awaitable[None]]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        # The chunks go out from a task of their own: a waiting stream is resumed through its await chain at every
        # token, which is short there and the whole middleware stack here.
        writer = asyncio.ensure_future(_write(self.events, scope.get(SERVER_SEND, send)))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not writer.done():  # the client went away (or the server is stopping): stop streaming
                writer.cancel()  # raised where `events` waits, which closes what it iterates
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((writer,))
        if not writer.cancelled():
            writer.result()  # an error of the stream goes on to the middleware, as it did from Starlette's


async def _write(events: Callable[[Write], Awaitable[None]], send: Send) -> None:
    await events(lambda chunk: send({"type": "http.response.body", "body": chunk, "more_body": True}))
    await send({"type": "http.response.body", "body": b"", "more_body": False})


class ClientDisconnected(Exception):
    pass


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run `work` (which must not read the request body) until it finishes or the client goes away; in that case
    cancel it (closing the engine generators it iterates) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
