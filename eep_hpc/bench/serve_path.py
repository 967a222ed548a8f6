"""The API process's own cost per streamed token, without sockets, ZMQ or clients: the real app (serve/app.py) over
ASGI, driven in-process, with an engine that gives every open stream its next token in the same instant, as
lockstep ranks do. It reports the process CPU per token and how long after its step each token's chunk reached
`send` (the part of the head's added delay that is serve/'s Python). A micro-benchmark for A/B of serve/ changes:

    python -m eep_hpc.bench.serve_path --streams 512 --tokens 64 --steps-per-s 50

The engine is in-process, so the figures leave out what bench-head measures besides: the rank messages, the socket
writes and the clients. `--server uvicorn` drives each request through uvicorn's own request cycle (httptools'; its
`send` frames the chunks) over a transport that takes the bytes and writes nothing, so the chunked framing and the
direct lane (serve/sse.py) are in; `--server asgi` (the default, as before) calls the app with a bare ASGI `send`.
A chunk is timed when it reaches `send` (asgi) or the transport (uvicorn).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import deque
from contextvars import ContextVar
from pathlib import Path

import numpy as np
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import RequestResponseCycle

from eep_hpc import protocol as P
from eep_hpc.config import ServeConfig
from eep_hpc.gc_heap import freeze_startup_heap
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.model.tokenizer import Tokenizer
from eep_hpc.serve.app import create_app
from eep_hpc.serve.output_queue import OutputQueue
from eep_hpc.serve.sse import DONE


# The stream whose request the current task serves: the engine's generator (started inside the response's task)
# hands it the (step, time) of each token put for it, and that stream's `send` (or transport) times them.
STREAM: ContextVar[dict] = ContextVar("serve_path_stream")
WARM_STEPS = 4  # steps before the measured ones


class LockstepEngine:
    """EngineClient: every `step()` puts one token into each open request's queue (offered to its sink first, as the
    head's dispatch does, where the app passes one)."""

    takes_sink = True

    def __init__(self, tokenizer: Tokenizer, token_ids: list[int]) -> None:
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, "bench", 4096
        self.vocab_size = tokenizer.backend.get_vocab_size()
        self.token_ids = token_ids
        self.open: dict[str, tuple[OutputQueue, int]] = {}  # request id -> (its queue, tokens left)
        self.stamps: dict[str, deque] = {}  # request id -> (step, its time) of each token put and not yet taken
        self.step_at = (0, 0.0)  # the step being put, and when

    def ready(self) -> bool:
        return True

    def cluster_state(self) -> dict:
        return {}

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: P.SamplingParams, sink=None):
        queue = OutputQueue(sink) if sink is not None else OutputQueue()  # (an export of older serve/ too)
        self.open[request_id] = (queue, sampling.max_tokens)
        stamps = self.stamps[request_id] = deque()
        STREAM.get()["tokens"] = stamps  # each chunk sent carries the tokens put so far
        try:
            while True:
                out = await queue.get()  # several tokens where the writer fell behind (merged)
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self.open.pop(request_id, None)
            self.stamps.pop(request_id, None)

    def step(self, k: int) -> int:
        self.step_at = (k, time.perf_counter())
        for rid, (queue, left) in list(self.open.items()):
            self.stamps[rid].append(self.step_at)
            left -= 1
            self.open[rid] = (queue, left)
            queue.put_nowait(P.RequestOutput(request_id=rid, new_token_ids=[self.token_ids[k % len(self.token_ids)]],
                                             finish_reason="length" if left == 0 else None))
        return len(self.open)


class NullTransport:
    """What uvicorn's cycle writes to: takes the bytes, times the chunks of text (the stream's `chunk`), counts the
    writes (each a `send` syscall on a real socket) in `writes`."""

    writes = 0

    def __init__(self, chunk) -> None:
        self.chunk = chunk

    def write(self, data: bytes) -> None:
        NullTransport.writes += 1
        self.chunk(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def run(streams: int, tokens: int, steps_per_s: float, freeze: bool = True, server: str = "asgi") -> dict:
    if tokens <= WARM_STEPS + 1:
        raise ValueError("tokens must exceed the 4 warm-up steps and the last one")
    tokenizer = Tokenizer.from_dir(ensure_tiny_checkpoint())
    ids = [i for i in range(3, 200) if tokenizer.decode([i]).strip()][:32]  # ids that decode to text alone
    engine = LockstepEngine(tokenizer, ids)
    app = create_app(engine, ServeConfig())
    if freeze:  # as the head and its API processes do once they are up
        freeze_startup_heap("serve_path")
    body = json.dumps({"model": "bench", "prompt": [5, 6, 7], "max_tokens": tokens, "stream": True,
                       "ignore_eos": True}).encode()
    warm = WARM_STEPS
    delays: list[float] = []  # per token of a measured step: its chunk's send minus its step's time
    burst: dict[int, float] = {}  # step -> when its last token's chunk reached send, after the step
    chunks = [0]
    statuses: list[int] = []
    ended = [0]  # responses that reached [DONE]
    done = asyncio.Event()

    def chunk(stream: dict, data: bytes) -> None:  # a body chunk reached send (asgi) or the transport (uvicorn)
        if b"data: {" in data:
            now = time.perf_counter()
            stamps = stream["tokens"]
            for k, at in stamps:
                if k >= warm:
                    delays.append(now - at)
                    burst[k] = now - at
            stamps.clear()
            chunks[0] += 1
        if data.endswith((DONE, DONE + b"\r\n", DONE + b"\r\n0\r\n\r\n")):  # alone, or with the body's end
            ended[0] += 1

    scope_of = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
                "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}

    async def one_uvicorn() -> None:
        stream = {"tokens": deque()}
        STREAM.set(stream)
        transport = NullTransport(lambda data: chunk(stream, data))
        event = asyncio.Event()
        cycle = RequestResponseCycle(  # by keyword: uvicorn is not pinned
            scope=dict(scope_of, headers=list(scope_of["headers"])), transport=transport,
            flow=FlowControl(transport), logger=None, access_logger=None, access_log=False, default_headers=[],
            message_event=event, expect_100_continue=False, keep_alive=True, on_response=lambda: None)
        cycle.body, cycle.more_body = bytearray(body), False
        event.set()
        await app(cycle.scope, cycle.receive, cycle.send)
        statuses.append(200 if cycle.response_complete else 0)

    async def one() -> None:
        if server == "uvicorn":
            return await one_uvicorn()
        sent_body = False
        stream = {"tokens": deque()}
        STREAM.set(stream)

        async def receive():
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": body, "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
            elif message["type"] == "http.response.body":
                chunk(stream, message.get("body", b""))

        await app(dict(scope_of), receive, send)

    NullTransport.writes = 0
    start_cpu = time.process_time()
    clients = [asyncio.create_task(one()) for _ in range(streams)]
    while len(engine.open) < streams:
        await asyncio.sleep(0.001)
    start_cpu = time.process_time() - start_cpu
    period = 1.0 / steps_per_s
    cpu0 = wall0 = n0 = None
    end_cpu, end_writes = 0.0, 0
    for k in range(tokens):
        if k == warm:
            cpu0, wall0, n0 = time.process_time(), time.perf_counter(), chunks[0]
        if k == tokens - 1:
            end_cpu, end_writes = time.process_time(), NullTransport.writes
        engine.step(k)
        await asyncio.sleep(max(0.0, period - (time.perf_counter() - engine.step_at[1])))
    await asyncio.gather(*clients)
    end_cpu = time.process_time() - end_cpu
    end_writes = NullTransport.writes - end_writes
    done.set()
    cpu, wall, n = time.process_time() - cpu0, time.perf_counter() - wall0, chunks[0] - n0
    measured = len(delays)  # tokens of the measured steps (all of them: every stream runs to its end)
    ms = np.asarray(delays) * 1e3
    bursts = np.asarray([v for k, v in burst.items() if warm <= k < tokens - 1]) * 1e3  # steps that end nothing
    return {"streams": streams, "server": server, "gc_frozen": freeze, "statuses": sorted(set(statuses)),
            "ended": ended[0],
            "tokens_per_stream": tokens, "steps_per_s": steps_per_s, "chunks": n, "tokens": measured,
            # the process's CPU (the driver's little share included) per token of the measured steps
            "cpu_us_per_token": cpu / measured * 1e6, "cpu_util": cpu / wall,
            # the CPU from the first request sent to every engine request open (HTTP, validation, prompt), per request
            "start_cpu_us_per_request": start_cpu / streams * 1e6,
            # the CPU from the last step (every request's last token, with its finish) to every response complete,
            # per request: the last chunk, the usage and [DONE] if any, the engine request and the response closed
            "end_cpu_us_per_request": end_cpu / streams * 1e6,
            # uvicorn: the transport writes from the last step on, per request (its last token comes with its finish)
            "end_writes_per_request": end_writes / streams if server == "uvicorn" else None,
            "step_to_send_ms": {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)),
                                "max": float(ms.max())},
            # how long after a step its last chunk reached send (lockstep: the whole burst's time), steps that end
            # no request
            "burst_ms": {"p50": float(np.percentile(bursts, 50)), "max": float(bursts.max()),
                         "last_step": burst[tokens - 1] * 1e3}}


def _loop_factory(name: str):
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=64, help="tokens per stream (one request each)")
    ap.add_argument("--steps-per-s", type=float, default=50.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-freeze", action="store_true", help="leave the start-up heap in the collector's walks")
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio",
                    help="the event loop (the head and its API processes run uvloop where it is installed)")
    ap.add_argument("--server", choices=["asgi", "uvicorn"], default="asgi",
                    help="a bare ASGI send, or uvicorn's request cycle (its framing, the direct lane) over a null "
                         "transport")
    ap.add_argument("--out", type=Path, help="write the runs here as JSON")
    args = ap.parse_args()
    runs = []
    for _ in range(args.repeats):
        with asyncio.Runner(loop_factory=_loop_factory(args.loop)) as runner:
            r = runner.run(run(args.streams, args.tokens, args.steps_per_s, not args.no_freeze, args.server))
        r["loop"] = args.loop
        print(f"serve_path: {r['streams']} streams: {r['cpu_us_per_token']:.2f} us CPU per token "
              f"({r['cpu_util']:.0%} busy), {r['start_cpu_us_per_request']:.0f} us per request to start it, "
              f"{r['end_cpu_us_per_request']:.0f} us to end it"
              f"{'' if r['end_writes_per_request'] is None else ' in %.1f writes' % r['end_writes_per_request']}, "
              f"step to send p50 {r['step_to_send_ms']['p50']:.2f} ms "
              f"p99 {r['step_to_send_ms']['p99']:.2f} ms; a step's burst p50 {r['burst_ms']['p50']:.2f} ms max "
              f"{r['burst_ms']['max']:.2f} ms, the last step's {r['burst_ms']['last_step']:.2f} ms", flush=True)
        runs.append(r)
    if args.out:
        args.out.write_text(json.dumps({"command": "python -m eep_hpc.bench.serve_path", "args": vars(args) | {
            "out": str(args.out)}, "runs": runs}, indent=1) + "\n")


if __name__ == "__main__":
    main()
