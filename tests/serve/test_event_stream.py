"""What a client of a streamed request sees, over ASGI without a server or ranks: the exact SSE bytes of a short
completion, one send per event but for the stream's last events (its finish, the usage if asked for, [DONE]), which
go out in one send that ends the body (`more_body: False`); the start message through the middleware stack (metrics
see its status), and a client that goes away mid-stream: the engine request is aborted and the response ends. Over
uvicorn's httptools request cycle (a transport that records its writes), those last events and the chunked body's
end are one transport write, each event its own chunk: the bytes on the wire are those of a send per event, and a
paused transport gets them in that many writes."""

from __future__ import annotations

import asyncio
import json

import pytest

from eep_hpc import protocol as P
from eep_hpc.config import ServeConfig
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.model.tokenizer import IncrementalDetokenizer, Tokenizer
from eep_hpc.serve import serving
from eep_hpc.serve.app import create_app

PROMPT = [5, 6, 7]
ID, CREATED = "cmpl-test", 1700000000


class FakeEngine:
    """EngineClient: each request gets `token_ids` one output at a time ("length" on the last), or tokens without
    end when `endless`."""

    def __init__(self, tokenizer: Tokenizer, token_ids: list[int], endless: bool = False) -> None:
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, "m", 4096
        self.vocab_size = tokenizer.backend.get_vocab_size()
        self.token_ids, self.endless = token_ids, endless
        self.started: list[str] = []
        self.finished: list[str] = []  # ended by the engine (all tokens given)
        self.aborted: list[str] = []  # closed before that

    def ready(self) -> bool:
        return True

    def cluster_state(self) -> dict:
        return {}

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: P.SamplingParams):
        self.started.append(request_id)
        done = False
        try:
            k = 0
            while True:
                await asyncio.sleep(0)
                done = last = not self.endless and k == len(self.token_ids) - 1  # then closed at this yield
                yield P.RequestOutput(request_id=request_id, new_token_ids=[self.token_ids[k % len(self.token_ids)]],
                                      finish_reason="length" if last else None)
                if last:
                    return
                k += 1
        finally:
            (self.finished if done else self.aborted).append(request_id)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(ensure_tiny_checkpoint())


@pytest.fixture
def token_ids(tokenizer) -> list[int]:
    return [i for i in range(3, 200) if tokenizer.decode([i]).strip()][:6]


@pytest.fixture(autouse=True)
def fixed_id(monkeypatch):
    monkeypatch.setattr(serving, "random_id", lambda prefix: ID)
    monkeypatch.setattr(serving, "now", lambda: CREATED)


def scope(path: str) -> dict:
    return {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 8000)}


async def call(app, path: str, body: dict, disconnect_after: int | None = None) -> list[dict]:
    """The messages the app sends for one request; the client leaves after `disconnect_after` body chunks."""
    sent: list[dict] = []
    read = False
    gone = asyncio.Event()

    async def receive():
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        chunks = sum(1 for m in sent if m["type"] == "http.response.body")
        if disconnect_after is not None and chunks >= disconnect_after:
            gone.set()
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            gone.set()  # as a server's receive does once the response is complete

    await asyncio.wait_for(app(scope(path), receive, send), 30)  # a guard against a hang, not a timing
    return sent


def completion_event(text: str, finish_reason: str | None, usage_key: bool = False) -> bytes:
    """A chunk of choice 0; `usage_key`: with "usage": null (include_usage asked for)."""
    chunk = {"id": ID, "object": "text_completion", "created": CREATED, "model": "m",
             "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if usage_key:
        chunk["usage"] = None
    return b"data: " + json.dumps(chunk, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


def usage_event(prompt_tokens: int, completion_tokens: int) -> bytes:
    chunk = {"id": ID, "object": "text_completion", "created": CREATED, "model": "m", "choices": [],
             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens}}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def completion_events(tokenizer, token_ids, usage: bool) -> tuple[list[bytes], list[bytes]]:
    """-> (the events sent one each, the stream's last events) of a completion of `token_ids` for PROMPT."""
    detok = IncrementalDetokenizer(tokenizer, PROMPT)
    pieces = [detok.add([t]) for t in token_ids]
    pieces[-1] += detok.flush()
    assert "".join(pieces) == tokenizer.decode(token_ids)
    last = [completion_event(pieces[-1], "length", usage)]
    if usage:
        last.append(usage_event(len(PROMPT), len(token_ids)))
    return [completion_event(p, None, usage) for p in pieces[:-1]], last + [b"data: [DONE]\n\n"]


@pytest.mark.parametrize("usage", [False, True])
def test_streamed_completion_bytes(tokenizer, token_ids, usage):
    engine = FakeEngine(tokenizer, token_ids)
    app = create_app(engine, ServeConfig())
    body = {"model": "m", "prompt": PROMPT, "max_tokens": len(token_ids), "stream": True, "ignore_eos": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    sent = asyncio.run(call(app, "/v1/completions", body))

    start, chunks = sent[0], sent[1:]
    assert start["type"] == "http.response.start" and start["status"] == 200
    headers = dict(start["headers"])
    assert headers[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert headers[b"cache-control"] == b"no-cache" and headers[b"x-accel-buffering"] == b"no"
    assert all(m["type"] == "http.response.body" for m in chunks)

    each, last = completion_events(tokenizer, token_ids, usage)
    # One send per event, the bytes exactly; the last events ([DONE] after them) in one send that ends the body.
    assert len(chunks) == len(each) + 1 == len(token_ids)
    assert [m["body"] for m in chunks] == each + [b"".join(last)]
    assert [m.get("more_body", False) for m in chunks] == [True] * len(each) + [False]
    assert engine.finished == [f"{ID}-0"] and engine.aborted == []
    exposed = app.state.metrics.render()
    assert b'eep_hpc:http_requests_total{method="POST",route="/v1/completions",status="200"} 1.0' in exposed


def test_streamed_completion_with_echo_bytes(tokenizer, token_ids):
    """The echo goes out with the first token's text; the chunks after it carry the text alone."""
    engine = FakeEngine(tokenizer, token_ids)
    app = create_app(engine, ServeConfig())
    body = {"model": "m", "prompt": PROMPT, "max_tokens": len(token_ids), "stream": True, "ignore_eos": True,
            "echo": True}
    sent = asyncio.run(call(app, "/v1/completions", body))

    detok = IncrementalDetokenizer(tokenizer, PROMPT)
    pieces = [detok.add([t]) for t in token_ids]
    pieces[-1] += detok.flush()
    pieces[0] = tokenizer.decode(PROMPT, skip_special_tokens=False) + pieces[0]
    want = [completion_event(p, None) for p in pieces[:-1]] + [completion_event(pieces[-1], "length")
                                                                 + b"data: [DONE]\n\n"]
    assert [m["body"] for m in sent[1:]] == want


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_leaving_mid_stream_aborts_the_engine_request(tokenizer, token_ids, path):
    engine = FakeEngine(tokenizer, token_ids, endless=True)
    app = create_app(engine, ServeConfig())
    body = {"model": "m", "max_tokens": 1000, "stream": True, "ignore_eos": True}
    body |= {"prompt": PROMPT} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    sent = asyncio.run(call(app, path, body, disconnect_after=4))  # returns: the endless stream was stopped

    assert engine.started == [f"{ID}-0"] and engine.aborted == [f"{ID}-0"] and engine.finished == []
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert len(bodies) >= 4 and all(m["more_body"] for m in bodies)  # never completed, no [DONE]
    assert not any(m["body"].endswith(b"[DONE]\n\n") for m in bodies)
    exposed = app.state.metrics.render()
    assert b'eep_hpc:num_requests_running{model_name="m"} 0.0' in exposed
    assert f'eep_hpc:http_requests_total{{method="POST",route="{path}",status="200"}} 1.0'.encode() in exposed


class RecordingTransport:
    """What uvicorn's cycle writes to: keeps each write; `pause_after` body writes (the head's not counted), it pauses
    the cycle's flow (as a full socket buffer does) and resumes it soon after."""

    def __init__(self, pause_after: int | None = None) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.pause_after, self.flow = pause_after, None

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        if self.pause_after is not None and len(self.writes) == 1 + self.pause_after:
            self.flow.pause_writing()
            asyncio.get_running_loop().call_later(0.01, self.flow.resume_writing)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def framed(event: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(event), event)


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("keep_alive", [True, False])
@pytest.mark.parametrize("paused", [False, True])
def test_a_streams_end_is_one_write_on_uvicorns_cycle(tokenizer, token_ids, usage, keep_alive, paused):
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

    engine = FakeEngine(tokenizer, token_ids)
    app = create_app(engine, ServeConfig())
    body = {"model": "m", "prompt": PROMPT, "max_tokens": len(token_ids), "stream": True, "ignore_eos": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    each, last = completion_events(tokenizer, token_ids, usage)
    transport = RecordingTransport(pause_after=len(each) if paused else None)
    responses = []

    async def run():
        event = asyncio.Event()
        cycle = RequestResponseCycle(  # by keyword: uvicorn is not pinned
            scope=scope("/v1/completions"), transport=transport, flow=FlowControl(transport), logger=None,
            access_logger=None, access_log=False, default_headers=[], message_event=event,
            expect_100_continue=False, keep_alive=keep_alive, on_response=lambda: responses.append(1))
        transport.flow = cycle.flow
        cycle.body, cycle.more_body = bytearray(json.dumps(body).encode()), False
        event.set()
        await asyncio.wait_for(app(cycle.scope, cycle.receive, cycle.send), 30)  # a guard against a hang
        return cycle

    cycle = asyncio.run(run())
    head, writes = transport.writes[0], transport.writes[1:]
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"transfer-encoding: chunked\r\n" in head
    # The bytes of a send per event and one for the end, each event its own chunk ...
    assert b"".join(writes) == b"".join(framed(e) for e in each + last) + b"0\r\n\r\n"
    # ... in a write per event but for the last ones, which go with the end in one, unless the transport is paused
    ends = [framed(e) for e in last] + [b"0\r\n\r\n"] if paused else [b"".join(framed(e) for e in last) + b"0\r\n\r\n"]
    assert writes == [framed(e) for e in each] + ends
    assert cycle.response_complete and responses == [1] and transport.closed is not keep_alive
    assert engine.finished == [f"{ID}-0"] and engine.aborted == []
    exposed = app.state.metrics.render()
    assert b'eep_hpc:http_requests_total{method="POST",route="/v1/completions",status="200"} 1.0' in exposed
