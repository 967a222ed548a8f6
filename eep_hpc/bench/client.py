"""One streamed /v1/completions request, timed the way `vllm bench serve` times it.

TTFT: send → first chunk carrying text. ITL: the gap between consecutive chunks carrying text (one entry per
chunk, as vLLM records it; the server sends one chunk per decode step unless the detokenizer holds back an
incomplete character). E2E: send → [DONE]. Output tokens come from the final usage chunk.

Two clients send it: `LeanClient` (the default for http:// URLs: plain keep-alive connections, bench/sse_client.py)
and httpx (`send`; https, or `eep-hpc bench --http-client httpx`). Why two: a burst's requests all start in one
event loop, and httpx spends ~0.7 ms of it on each, so the last of 64 is sent ~45 ms after the first (64 at once
against a server that answers at once, 2-core CPU: p99 of the client's own TTFT 47-70 ms with httpx, 14-15 ms
lean). That is the client, not the server, and a burst of 64 users does not share one client.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from dataclasses import dataclass, field

import httpx

from eep_hpc.bench.dataset import BenchRequest
from eep_hpc.bench.sse_client import Connection

ERROR_CHARS = 300  # an error string is cut to this length


@dataclass
class RequestResult:
    input_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    e2e: float = 0.0
    error: str = ""
    start: float = 0.0  # time.perf_counter() when sent (for the timeline)

    @property
    def success(self) -> bool:
        return not self.error


def completion_body(model: str, req: BenchRequest) -> dict:
    return {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "ignore_eos": True,
            "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


async def send(client: httpx.AsyncClient, url: str, model: str, req: BenchRequest) -> RequestResult:
    """Never raises for a failed request: the error lands in `RequestResult.error`."""
    result = RequestResult(req.input_len)
    result.start = start = time.perf_counter()
    last, chunks, done = start, 0, False
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=completion_body(model, req)) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                result.error = f"HTTP {r.status_code}: {body}"[:ERROR_CHARS]
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"stream error: {json.dumps(chunk['error'])}"[:ERROR_CHARS]
                    return result
                now = time.perf_counter()
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        result.error = f"{type(e).__name__}: {e}"[:ERROR_CHARS]
        return result
    result.e2e = time.perf_counter() - start
    if not done:
        result.error = "stream ended without [DONE]"
    elif chunks == 0:
        result.error = "no tokens received"
    elif not result.output_tokens:
        result.output_tokens = chunks  # no usage chunk: count text chunks
    return result


class LeanClient:
    """Sends each request on an idle keep-alive connection (a new one when none is idle) with the lean SSE
    client; what it returns is `send`'s RequestResult."""

    def __init__(self, url: str, headers: dict[str, str], timeout_s: float):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the lean client speaks plain http, not {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.headers, self.timeout_s = headers, timeout_s
        self.idle: list[Connection] = []

    async def send(self, model: str, req: BenchRequest) -> RequestResult:
        """Never raises for a failed request: the error lands in `RequestResult.error`."""
        result = RequestResult(req.input_len)
        conn = self.idle.pop() if self.idle else Connection(self.host, self.port, self.headers)
        result.start = time.perf_counter()
        sent = time.time()  # the lean client stamps arrivals with time.time()
        try:
            got = await asyncio.wait_for(conn.complete(completion_body(model, req)), self.timeout_s)
        except asyncio.TimeoutError:
            conn.close()
            result.error = f"no answer in {self.timeout_s:g} s"
            return result
        result.e2e = time.time() - sent
        if got.error:  # the connection was closed by `complete`
            result.error = got.error[:ERROR_CHARS]
            return result
        self.idle.append(conn)
        at = got.received_at
        if not at:
            result.error = "no tokens received"
            return result
        result.ttft = at[0] - sent
        result.itl = [b - a for a, b in zip(at, at[1:])]
        result.output_tokens = got.completion_tokens or got.text_events
        return result

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()
