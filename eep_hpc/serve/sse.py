"""Server-sent events and client disconnects.

Whatever way a response ends (finished, client gone, server shutting down), the iterator that produced it is
closed, so the engine requests behind it are aborted and their KV blocks freed.

`EventStreamResponse` is the per-token path of every stream, so it does as little per chunk as it can: it writes
each chunk with the server's own `send` (set in the scope by `app.App`, the outermost ASGI layer), not through the
send wrappers of the middleware stack, which only look at the start message (status, "response started"); the start
goes through them as usual. So no middleware that rewrites response bodies (e.g. GZip) may be added to the app. As in
Starlette's StreamingResponse, the chunks go out from a task of their own while the request's task waits for the
client's disconnect and then cancels it, which may leave the body iterator suspended at a `yield`; it is closed
explicitly (shielded from that cancellation) instead of being left to the garbage collector.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Awaitable, TypeVar

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


class EventStreamResponse(Response):
    """text/event-stream from an async iterator of ready bytes (one `send` per item); see the module's docstring."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        events = self._events
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        # The chunks go out from a task of their own: a waiting stream is resumed through its await chain at every
        # token, which is short there and the whole middleware stack here.
        writer = asyncio.ensure_future(_write(events, scope.get(SERVER_SEND, send)))
        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        try:
            await asyncio.wait((writer, watcher), return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            with anyio.CancelScope(shield=True):
                if not writer.done():  # the client went away (or the server is stopping): stop streaming
                    writer.cancel()
                    await asyncio.wait((writer,))
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()
        if not writer.cancelled():
            writer.result()  # an error of the stream goes on to the middleware, as it did from Starlette's


async def _write(events: AsyncIterator[bytes], write: Send) -> None:
    async for chunk in events:
        await write({"type": "http.response.body", "body": chunk, "more_body": True})
    await write({"type": "http.response.body", "body": b"", "more_body": False})


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
