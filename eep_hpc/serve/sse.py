"""Server-sent events and client disconnects.

Whatever way a response ends (finished, client gone, server shutting down), the iterator that produced it is
closed, so the engine requests behind it are aborted and their KV blocks freed.

`EventStreamResponse` is the per-token path of every stream, so it does as little per chunk as it can: it writes
each chunk with the server's own `send` (set in the scope by `app.App`, the outermost ASGI layer), not through the
send wrappers of the middleware stack, which only look at the start message (status, "response started"); the start
goes through them as usual. So no middleware that rewrites response bodies (e.g. GZip) may be added to the app. The
events come from a coroutine that writes each one (`await write(chunk)`), one layer less per token than an async
generator iterated by a loop that sends. A stream's last events (its finish, usage or error, and [DONE]) come
together, with no wait between them, and go out with the body's end (`await end(group)`): one `send` with
`more_body: False` in place of a send each and one more for the end (below for uvicorn). As in Starlette's
StreamingResponse, they go out from a task of their own while the request's task waits for the client's disconnect
and then cancels that task: the cancellation is raised where the coroutine waits (for its next delta, or in a
write), so its `finally` closes what it iterates, and the response waits for that (shielded from a cancellation of
its own).

The direct lane (`DirectLane`, for a stream of one choice of plain text: serving.py) goes further: once the start has
gone out the usual way, the chunks of its text-only deltas are written straight to uvicorn's transport (httptools'
request cycle, the server's default where httptools is installed) from where the engine dispatches its tokens
(generation.py), framed as that cycle frames a body chunk (`<size hex>\\r\\n<chunk>\\r\\n`), with no task woken
per token. It takes a chunk only while the cycle's own `send` would write it at once: the transport not paused
(else the chunk waits in the stream's queue and goes through `send`, which waits for the client to read: nothing
is lost, nothing buffers without bound), the client still there, the response not complete. Everything else (the
first chunks, a finish, usage, [DONE], errors) goes from the stream's task (through `send`, or the end below), after
the chunks written directly (one event loop, one transport, in order). A client leaving is seen as before (the watcher
below), and cancels the task where it sleeps. Another server (h11, or an ASGI test harness) gets no lane.

On that same cycle (lane or not), a stream's last events and the chunked body's end go to the transport in one
write (`_end_on_cycle`): each event framed as its own chunk, as the cycle's `send` would frame it, then the
terminating chunk; so the bytes on the wire are those of a send per event and one for the end, in one `send`
syscall instead of one per event and one more. The response is then completed as the cycle's `send` completes
it. One send of the events joined would make them one chunk (other bytes on the wire), and the cycle's send writes
a body and the terminator in one write but cannot frame two events. Where the cycle's send would not write at once
(transport paused, client gone), the group goes through `send`, a send per event and one for the end, as before.
Elsewhere (h11, a harness) the group is one `send` of the events joined (the same body; on h11, one chunk).
"""

from __future__ import annotations

import asyncio
import json
from json.encoder import encode_basestring  # json.dumps(text, ensure_ascii=False) without a JSONEncoder per call
from typing import Any, Awaitable, Callable, TypeVar

import anyio
from fastapi import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

try:
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle as _HttptoolsCycle
except ImportError:  # no httptools: uvicorn serves with h11, whose framing is h11's, and there is no lane
    _HttptoolsCycle = None

T = TypeVar("T")

DONE = b"data: [DONE]\n\n"


def event(payload: str | bytes | dict[str, Any]) -> bytes:
    if isinstance(payload, dict):
        payload = json.dumps(payload, ensure_ascii=False)
    if isinstance(payload, str):
        payload = payload.encode()
    return b"data: " + payload + b"\n\n"


SERVER_SEND = "eep_hpc.server_send"  # scope key: the send the server gave the app, before any middleware


Write = Callable[[bytes], Awaitable[None]]  # sends one event (a chunk of the body)
End = Callable[[list[bytes]], Awaitable[None]]  # sends a stream's last events and ends the body, at once (see above)


def _httptools_cycle(server_send: Any) -> Any | None:
    """The server's request cycle behind `server_send` if it is httptools' and its response a started chunked one
    (not HEAD) with every attribute the lane and the end read; else None. uvicorn is not pinned: a version without
    them streams through `send`, as h11 does."""
    cycle = getattr(server_send, "__self__", None)
    if _HttptoolsCycle is None or type(cycle) is not _HttptoolsCycle:
        return None
    try:
        if (not cycle.response_started or cycle.chunked_encoding is not True
                or cycle.scope.get("method") == "HEAD"):
            return None
        (cycle.flow.write_paused, cycle.transport.write, cycle.disconnected, cycle.response_complete,  # noqa: B018
         cycle.keep_alive, cycle.message_event.set, cycle.on_response)
    except AttributeError:
        return None
    return cycle


def _end_on_cycle(cycle: Any, group: list[bytes]) -> bool:
    """Write `group` (a stream's last events) and the chunked body's end to the cycle's transport in one write, each
    event framed as the cycle's send frames a body chunk, and complete the response as its send does for
    `more_body: False` (the same lines in uvicorn 0.29 and 0.55). False, with nothing done, where that send would not
    write at once."""
    if cycle.flow.write_paused or cycle.disconnected or cycle.response_complete:
        return False
    cycle.transport.write(b"".join([b"%x\r\n%b\r\n" % (len(e), e) for e in group if e]) + b"0\r\n\r\n")
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True


class DirectLane:
    """A stream's way around its task for the chunks of text-only deltas (generation.Lane; module docstring).
    serving.py sets `template` (the chunk before and after its JSON-quoted text) and `written` (the write log's);
    EventStreamResponse opens it on the server's request cycle once the response has started."""

    __slots__ = ("_cycle", "_flow", "_write", "opened", "template", "written")

    def __init__(self) -> None:
        self._cycle = self._flow = self._write = None
        self.opened = False
        self.template: tuple[bytes, bytes] | None = None
        self.written: Callable[[int, int], None] | None = None  # (choice index, its tokens so far), after a write

    def open(self, cycle: Any) -> None:
        """Take the transport of the server's cycle (one `_httptools_cycle` found)."""
        self._cycle, self._flow, self._write = cycle, cycle.flow, cycle.transport.write
        self.opened = True

    def ready(self) -> bool:
        cycle = self._cycle
        return (cycle is not None and self.template is not None and not self._flow.write_paused
                and not cycle.disconnected and not cycle.response_complete)

    def emit(self, text: str, num_tokens: int) -> None:
        before, after = self.template
        chunk = before + encode_basestring(text).encode() + after
        self._write(b"%x\r\n%b\r\n" % (len(chunk), chunk))  # as the cycle's send frames a body chunk
        if self.written is not None:
            self.written(0, num_tokens)


class EventStreamResponse(Response):
    """text/event-stream from `events(write, end)`, a coroutine that writes each event as it is ready (one `send`
    each) and ends with `end(group)`, its last events (one `send`, or one write on uvicorn's httptools cycle); see the
    module's docstring. `lane`: opened on the server's cycle once the start is out."""

    media_type = "text/event-stream"

    _raw_headers: list[tuple[bytes, bytes]] | None = None  # what init_headers makes of HEADERS, made once

    HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

    def __init__(self, events: Callable[[Write, End], Awaitable[None]], lane: DirectLane | None = None) -> None:
        self.status_code = 200
        self.background = None
        cls = type(self)
        if cls._raw_headers is None:
            self.init_headers(self.HEADERS)
            cls._raw_headers = list(self.raw_headers)
        self.raw_headers = list(cls._raw_headers)  # a list of its own, as init_headers makes
        self.events, self.lane = events, lane

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        server_send = scope.get(SERVER_SEND, send)
        cycle = _httptools_cycle(server_send)
        if self.lane is not None and cycle is not None:
            self.lane.open(cycle)
        # The chunks go out from a task of their own: a waiting stream is resumed through its await chain at every
        # token, which is short there and the whole middleware stack here.
        loop = asyncio.get_running_loop()
        writer = loop.create_task(_write(self.events, server_send, cycle))
        watcher = loop.create_task(_wait_disconnect(receive))
        try:
            await _first_done(loop, writer, watcher)
        finally:
            watcher.cancel()
            if not writer.done():  # the client went away (or the server is stopping): stop streaming
                writer.cancel()  # raised where `events` waits, which closes what it iterates
                with anyio.CancelScope(shield=True):
                    await asyncio.wait((writer,))
        if not writer.cancelled():
            writer.result()  # an error of the stream goes on to the middleware, as it did from Starlette's


async def _write(events: Callable[[Write, End], Awaitable[None]], send: Send, cycle: Any | None) -> None:
    ended = False

    async def end(group: list[bytes]) -> None:
        nonlocal ended
        ended = True
        if cycle is not None:
            if _end_on_cycle(cycle, group):
                return
            for e in group:  # the cycle's send waits (a paused transport) or drops (a gone client): as before
                await send({"type": "http.response.body", "body": e, "more_body": True})
            group = []
        await send({"type": "http.response.body", "body": b"".join(group), "more_body": False})

    await events(lambda chunk: send({"type": "http.response.body", "body": chunk, "more_body": True}), end)
    if not ended:
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _first_done(loop: asyncio.AbstractEventLoop, a: asyncio.Task, b: asyncio.Task) -> None:
    """asyncio.wait((a, b), return_when=FIRST_COMPLETED) without its sets and counter: a request's start and end
    each paid for them."""
    if a.done() or b.done():
        return
    first = loop.create_future()

    def wake(_: asyncio.Task) -> None:
        if not first.done():
            first.set_result(None)

    a.add_done_callback(wake)
    b.add_done_callback(wake)
    try:
        await first
    finally:
        a.remove_done_callback(wake)
        b.remove_done_callback(wake)


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
