"""A lean streaming client for the head benchmark: HTTP/1.1 keep-alive connections, each running one streamed
/v1/completions request after another, with the time each SSE event arrived.

Why not httpx (bench/client.py): at thousands of streams it spends more CPU per event than the head under test,
so the client would be what is measured. Here an asyncio Protocol takes the bytes as they come, undoes the chunked
transfer encoding, splits events, and fully parses JSON only where it must (a request's first event, its last
ones, errors); token events are recognised by their bytes.

An event may carry several tokens (an API process merges the tokens a stream's writer finds queued,
serve/output_queue.py). Given the text of each output token (`piece_chars`: the characters of token k is
piece_chars[k % len], as the stand-in ranks repeat the prompt), every token gets the arrival time of the event
that completed its text; without it, each event with text counts as one token.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

TOKEN_EVENT = b'"finish_reason":null'  # a chunk of a choice that goes on (text, or nothing)
EMPTY_TEXT = b'"text":""'
TEXT_START, TEXT_END = b'"text":"', b'","logprobs"'  # around a completion chunk's text (quotes in it are escaped)


@dataclass
class StreamResult:
    request_id: str = ""
    max_tokens: int = 0  # what the request asked for
    received_at: list[float] = field(default_factory=list)  # time.time() each token arrived (see piece_chars)
    text_events: int = 0  # events that carried text (fewer than tokens where the server merged some)
    completion_tokens: int = 0  # from the usage chunk
    finish_reason: str | None = None
    text: str = ""  # only when asked for (keep_text)
    status: int = 0
    error: str = ""
    local_port: int = 0  # of the connection it came on (which server process took it: bench-head)
    stream: int = 0  # which of the load's streams (connections) sent it (bench-head)

    @property
    def success(self) -> bool:
        return not self.error


class _Response(asyncio.Protocol):
    """Reads responses on one connection; `expect()` arms it for the next one."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(exc)
        if self.done is not None and not self.done.done():
            self.result.error = self.result.error or f"connection closed ({exc or 'by the server'})"
            self.done.set_result(self.result)

    def expect(self, keep_text: bool, piece_chars: list[int] | None = None) -> asyncio.Future:
        if piece_chars is not None and min(piece_chars, default=0) < 1:
            raise ValueError(f"every token needs text of its own to be counted by it, got {piece_chars}")
        self.result, self.keep_text, self.piece_chars = StreamResult(), keep_text, piece_chars
        self.chars = 0  # characters of text received and not yet counted as tokens
        self.raw = bytearray()
        self.headers_done, self.chunked = False, False
        self.length = -1  # a response that is not chunked (an error's JSON): its Content-Length
        self.body = bytearray()  # de-chunked bytes not yet split into events
        self.texts: list[str] = []
        self.done = asyncio.get_running_loop().create_future()
        return self.done

    def data_received(self, data: bytes) -> None:
        now = time.time()
        if self.done is None or self.done.done():
            return
        self.raw += data
        if not self.headers_done:
            end = self.raw.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.raw[:end]).decode("latin-1").lower()
            del self.raw[: end + 4]
            self.headers_done = True
            self.result.status = int(head.split(" ", 2)[1])
            self.chunked = "transfer-encoding: chunked" in head
            if self.result.status != 200 or not self.chunked:
                self.result.error = f"HTTP {self.result.status}" + ("" if self.chunked else " (not chunked)")
            if not self.chunked:
                found = [line for line in head.split("\r\n") if line.startswith("content-length:")]
                self.length = int(found[0].split(":", 1)[1]) if found else 0
        if self.chunked:
            self._dechunk(now)
        elif len(self.raw) >= self.length:  # the whole body: the error says what it was
            body = bytes(self.raw[: self.length]).decode(errors="replace")
            del self.raw[: self.length]
            self.result.error += f": {body}" if body else ""
            self.done.set_result(self.result)

    def _dechunk(self, now: float) -> None:
        raw = self.raw
        while True:
            eol = raw.find(b"\r\n")
            if eol < 0:
                return
            size = int(raw[:eol].split(b";", 1)[0], 16)
            if len(raw) < eol + 2 + size + 2:
                return
            if size == 0:  # the response's end
                del raw[: eol + 4]
                self._finish()
                return
            self.body += raw[eol + 2 : eol + 2 + size]
            del raw[: eol + 2 + size + 2]
            self._events(now)

    def _events(self, now: float) -> None:
        body, r = self.body, self.result
        start = 0
        while True:
            end = body.find(b"\n\n", start)
            if end < 0:
                break
            ev = bytes(body[start:end])
            start = end + 2
            if r.error:
                continue
            if TOKEN_EVENT in ev and r.request_id:
                if EMPTY_TEXT not in ev:
                    self._text_arrived(ev, now)
                continue
            if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                continue
            chunk = json.loads(ev[6:])
            if "error" in chunk:
                r.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                continue
            r.request_id = r.request_id or chunk.get("id", "")
            for c in chunk.get("choices") or []:
                if c.get("text"):
                    self._tokens_arrived(len(c["text"]), now)
                    self.texts.append(c["text"])
                if c.get("finish_reason") is not None:
                    r.finish_reason = c["finish_reason"]
            if chunk.get("usage"):
                r.completion_tokens = chunk["usage"]["completion_tokens"]
        del body[:start]

    def _text_arrived(self, ev: bytes, now: float) -> None:
        if self.piece_chars is None and not self.keep_text:  # one token per event
            self._tokens_arrived(0, now)
            return
        start = ev.find(TEXT_START) + len(TEXT_START)
        raw = ev[start : ev.find(TEXT_END, start)]
        text = json.loads(b'"' + raw + b'"') if b"\\" in raw else raw.decode()
        if self.keep_text:
            self.texts.append(text)
        self._tokens_arrived(len(text), now)

    def _tokens_arrived(self, chars: int, now: float) -> None:
        """`chars` more characters of text: every token whose text they complete arrived now."""
        lens, received = self.piece_chars, self.result.received_at
        self.result.text_events += 1
        if lens is None:
            received.append(now)
            return
        self.chars += chars
        while self.chars >= (need := lens[len(received) % len(lens)]):
            self.chars -= need
            received.append(now)

    def _finish(self) -> None:
        self.result.text = "".join(self.texts)
        if not self.result.error and self.result.finish_reason is None:
            self.result.error = "stream ended without a finish reason"
        self.done.set_result(self.result)


class Connection:
    """One keep-alive connection to the API; one request at a time."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None):
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.proto: _Response | None = None

    async def _connect(self) -> _Response:
        if self.proto is None or self.proto.closed.done():
            _, self.proto = await asyncio.get_running_loop().create_connection(_Response, self.host, self.port)
        return self.proto

    async def complete(self, body: dict, keep_text: bool = False, piece_chars: list[int] | None = None
                       ) -> StreamResult:
        """POST /v1/completions with `body` (stream: true) -> what arrived; never raises for a failed request."""
        try:
            proto = await self._connect()
        except OSError as e:
            return StreamResult(error=f"cannot connect: {e}")
        payload = json.dumps(body).encode()
        done = proto.expect(keep_text, piece_chars)
        proto.transport.write(
            f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n{self.extra}\r\n".encode() + payload)
        result = await done
        result.max_tokens = body.get("max_tokens", 0)
        result.local_port = (proto.transport.get_extra_info("sockname") or ("", 0))[1]
        if result.error:  # the connection's state is unknown: a fresh one for the next request
            self.close()
        return result

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.close()
        self.proto = None
