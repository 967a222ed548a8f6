"""The direct lane (sse.DirectLane): a plain stream's text chunks written to uvicorn's transport where the engine
hands out its tokens, no task woken per token. What a client reads over a real socket (uvicorn with httptools, the
raw chunked body) must be the bytes the general path sends for the same tokens: completions and chat, stop strings,
max_tokens, include_usage, echo. A client that leaves mid-stream gets its engine request aborted while another keeps
streaming; a client that stops reading (the transport pauses) loses no chunk.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from eep_hpc import protocol as P
from eep_hpc.config import ServeConfig
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.model.tokenizer import Tokenizer
from eep_hpc.serve import serving
from eep_hpc.serve.app import create_app
from eep_hpc.serve.output_queue import OutputQueue
from eep_hpc.serve.server import ApiServer

TEXT = 'Say "hi"\\ to the wörld, ünïcode ✓ done.\nAgain and again: the end of it all, and more after it.'
PROMPT = [5, 6, 7]


class PushEngine:
    """EngineClient that takes sinks: `step()` puts the next token of `script` into every open request's queue, as
    the head's dispatch of a rank's step does ("length" at max_tokens unless `endless`). It counts the outputs the
    lane took (`direct`) and those it declined before a finish (`declined`)."""

    takes_sink = True

    def __init__(self, tokenizer: Tokenizer, script: list[int], endless: bool = False) -> None:
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, "m", 1 << 16
        self.vocab_size = tokenizer.backend.get_vocab_size()
        self.script, self.endless = script, endless
        self.open: dict[str, list] = {}  # request id -> [queue, tokens given, tokens left]
        self.started: list[str] = []
        self.finished: list[str] = []
        self.aborted: list[str] = []
        self.direct = self.declined = 0

    def ready(self) -> bool:
        return True

    def cluster_state(self) -> dict:
        return {}

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: P.SamplingParams,
                       sink=None):
        counted = None
        if sink is not None:
            def counted(out: P.RequestOutput) -> bool:
                took = sink(out)
                if took:
                    self.direct += 1
                elif out.finish_reason is None:
                    self.declined += 1
                return took
        queue = OutputQueue(counted)
        self.open[request_id] = [queue, 0, sampling.max_tokens]
        self.started.append(request_id)
        done = False
        try:
            while True:
                out = await queue.get()
                done = out.finish_reason is not None
                yield out
                if done:
                    return
        finally:
            self.open.pop(request_id, None)
            (self.finished if done else self.aborted).append(request_id)

    def step(self) -> None:
        for rid, state in list(self.open.items()):
            queue, k, left = state
            state[1], state[2] = k + 1, left - 1
            last = not self.endless and left == 1
            queue.put_nowait(P.RequestOutput(request_id=rid, new_token_ids=[self.script[k % len(self.script)]],
                                             finish_reason="length" if last else None))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_dir(ensure_tiny_checkpoint())


@pytest.fixture
def fixed_id(monkeypatch):
    monkeypatch.setattr(serving, "random_id", lambda prefix: f"{prefix}-test")
    monkeypatch.setattr(serving, "now", lambda: 1700000000)


async def serving_app(engine, period_s: float = 0.001, sndbuf: int | None = None):
    app = create_app(engine, ServeConfig())
    server = ApiServer(app, ServeConfig(host="127.0.0.1", port=0), graceful_timeout_s=1, log_level="warning")
    server.bind()
    if sndbuf is not None:  # accepted connections inherit it
        server._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    await server.start()

    async def stepper():
        while True:
            engine.step()
            await asyncio.sleep(period_s)

    return app, server, asyncio.create_task(stepper())


async def post(port: int, path: str, body: dict, rcvbuf: int | None = None):
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    data = json.dumps(body).encode()
    writer.write(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                 b"Connection: close\r\n\r\n%s" % (path.encode(), len(data), data))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), head
    assert b"transfer-encoding: chunked" in head
    return reader, writer


def unchunk(raw: bytes) -> list[bytes]:
    """The chunks of a chunked body (each must be a whole SSE event), the terminating one included as b""."""
    chunks = []
    while True:
        size, _, raw = raw.partition(b"\r\n")
        n = int(size, 16)
        chunks.append(raw[:n])
        assert raw[n:n + 2] == b"\r\n"
        raw = raw[n + 2:]
        if n == 0:
            assert raw == b""
            return chunks


async def whole_body(port: int, path: str, body: dict) -> bytes:
    reader, writer = await post(port, path, body)
    raw = await asyncio.wait_for(reader.read(), 30)  # to EOF (Connection: close); a guard, not a timing
    writer.close()
    return raw


COUNTED = (b"eep_hpc:num_requests_running", b"eep_hpc:prompt_tokens_total", b"eep_hpc:generation_tokens_total",
           b"eep_hpc:request_success_total", b"eep_hpc:time_to_first_token_seconds_count",
           b"eep_hpc:inter_token_latency_seconds_count", b"eep_hpc:e2e_request_latency_seconds_count",
           b"eep_hpc:http_requests_total")


def counted_metrics(app) -> list[bytes]:
    """The request's counters (not its timings) as /metrics shows them."""
    return [line for line in app.state.metrics.render().splitlines() if line.startswith(COUNTED)]


def run_once(tokenizer, script, path, body, lane: bool, endless=False):
    """-> (the raw chunked body, the engine, the request's counters)."""
    async def run():
        engine = PushEngine(tokenizer, script, endless)
        if not lane:
            engine.takes_sink = False  # the general path: every output through the stream's task
        app, server, stepper = await serving_app(engine)
        try:
            return await whole_body(server.port, path, body), engine, counted_metrics(app)
        finally:
            stepper.cancel()
            await server.stop()

    return asyncio.run(run())


CASES = {
    "completion-length": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 30}),
    "completion-usage": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 30,
                                             "stream_options": {"include_usage": True}}),
    "completion-stop": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 60, "stop": ["ünïcode", "zzz"],
                                            "stream_options": {"include_usage": True}}),
    "completion-stop-included": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 60, "stop": ["the end"],
                                                     "include_stop_str_in_output": True}),
    "completion-stop-after-min-tokens": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 200, "stop": ["the"],
                                                             "min_tokens": 15}),
    "completion-echo": ("/v1/completions", {"prompt": PROMPT, "max_tokens": 20, "echo": True}),
    "chat-length": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 40,
                                             "stream_options": {"include_usage": True}}),
    "chat-stop": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                                           "stop": ["again"]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_direct_lane_sends_the_general_paths_bytes(tokenizer, fixed_id, case):
    path, extra = CASES[case]
    body = {"model": "m", "stream": True, "ignore_eos": True, **extra}
    script = tokenizer.encode(TEXT)
    want, general, want_metrics = run_once(tokenizer, script, path, body, lane=False)
    got, direct, got_metrics = run_once(tokenizer, script, path, body, lane=True)
    assert general.direct == 0 and direct.direct > 10  # the lane took most tokens; the general path none
    assert got == want  # the whole chunked body, byte for byte
    assert got_metrics == want_metrics and len(want_metrics) >= len(COUNTED)  # tokens, gaps, finish reason
    events = unchunk(got)
    assert events[-2:] == [b"data: [DONE]\n\n", b""]
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    assert finish == ("stop" if "stop" in extra else "length")
    if "include_usage" in str(extra):
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["prompt_tokens"] > 0
    if not extra.get("echo") and "stop" not in extra:
        text = "".join(c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or ""
                       for c in chunks if c["choices"])
        assert text == tokenizer.decode(script[:extra["max_tokens"]])


def test_a_client_leaving_mid_stream_is_aborted_while_another_streams_on(tokenizer):
    script = tokenizer.encode(TEXT)

    async def run():
        engine = PushEngine(tokenizer, script, endless=True)
        app, server, stepper = await serving_app(engine)
        try:
            body = {"model": "m", "prompt": PROMPT, "max_tokens": 10_000, "stream": True}
            leaver, leaver_w = await post(server.port, "/v1/completions", body)
            stayer, stayer_w = await post(server.port, "/v1/completions", body)
            for _ in range(10):
                await leaver.readuntil(b"\n\n")
            leaver_w.close()
            gone = engine.started[0]
            for _ in range(3000):  # until its request is aborted (about one step)
                if gone in engine.aborted:
                    break
                await asyncio.sleep(0.001)
            assert engine.aborted == [gone] and gone not in engine.open
            direct = engine.direct
            got = b""
            while got.count(b"data: ") < 50:  # the other keeps streaming, through the lane
                got += await asyncio.wait_for(stayer.read(4096), 10)
            assert engine.direct > direct + 40 and engine.started[1] in engine.open
            stayer_w.close()
            for _ in range(3000):
                if not engine.open:
                    break
                await asyncio.sleep(0.001)
            assert engine.aborted == engine.started and engine.finished == []
            assert b'eep_hpc:num_requests_running{model_name="m"} 0.0' in app.state.metrics.render()
        finally:
            stepper.cancel()
            await server.stop()

    asyncio.run(run())


def test_a_slow_reader_loses_no_chunk(tokenizer):
    """The client stops reading: the kernel's buffers and the transport's fill, the transport pauses, the lane
    declines and the outputs wait in the stream's queue (merged) for `send`, which waits for the client. It then
    reads the whole stream: every token's text, the finish, usage and [DONE]."""
    script = tokenizer.encode(TEXT)
    tokens = 4000

    async def run():
        engine = PushEngine(tokenizer, script)
        app, server, stepper = await serving_app(engine, period_s=0, sndbuf=4096)
        try:
            body = {"model": "m", "prompt": PROMPT, "max_tokens": tokens, "stream": True, "ignore_eos": True,
                    "stream_options": {"include_usage": True}}
            reader, writer = await post(server.port, "/v1/completions", body, rcvbuf=4096)
            for _ in range(5000):  # the client reads nothing until the lane had to decline
                if engine.declined:
                    break
                await asyncio.sleep(0.001)
            assert engine.declined and engine.open, "the transport never paused"
            raw = await asyncio.wait_for(reader.read(), 30)
            writer.close()
            return raw, engine
        finally:
            stepper.cancel()
            await server.stop()

    raw, engine = asyncio.run(run())
    events = unchunk(raw)
    assert events[-2:] == [b"data: [DONE]\n\n", b""]
    chunks = [json.loads(e.removeprefix(b"data: ")) for e in events[:-2]]
    assert chunks[-1]["usage"]["completion_tokens"] == tokens
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in choices) == tokenizer.decode([script[k % len(script)] for k in range(tokens)])
    assert choices[-1]["finish_reason"] == "length"
    assert engine.direct > 100 and len(choices) < tokens  # the lane wrote some; the held-up tokens were merged
    assert engine.finished and not engine.aborted
