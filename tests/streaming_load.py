"""Clients that stream greedy completions over HTTP while a test changes the cluster underneath them."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

import httpx

PROMPTS = [f"Request {i}: the {w} of the story is" for i, w in enumerate(
    ["start", "middle", "end", "hero", "place", "time", "cause", "moral",
     "voice", "twist", "theme", "setting", "plot", "villain", "ending", "title"])]


@dataclass
class LoadResult:
    texts: dict[int, list[str]] = field(default_factory=dict)  # prompt index -> texts of completed requests
    failures: list[str] = field(default_factory=list)
    completed: int = 0


async def stream_completion(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text, done, finish = [], False, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            text.append(chunk["choices"][0]["text"])
            finish = chunk["choices"][0]["finish_reason"] or finish
    if not done or finish != "length":
        raise RuntimeError(f"stream ended without [DONE] or with finish_reason={finish!r}")
    return "".join(text)


async def reference_texts(url: str, model: str, max_tokens: int, headers: dict | None = None) -> list[str]:
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        return list(await asyncio.gather(*[stream_completion(client, url, model, p, max_tokens) for p in PROMPTS]))


async def run_load(url: str, model: str, max_tokens: int, stop: asyncio.Event, streams: int = 16,
                   headers: dict | None = None) -> LoadResult:
    """`streams` clients, each issuing requests back to back (prompt i, i + streams, ...) until `stop` is set."""
    result = LoadResult()

    async def client_loop(worker: int):
        async with httpx.AsyncClient(timeout=300, headers=headers) as client:
            i = worker
            while not stop.is_set():
                k = i % len(PROMPTS)
                try:
                    text = await stream_completion(client, url, model, PROMPTS[k], max_tokens)
                    result.texts.setdefault(k, []).append(text)
                    result.completed += 1
                except Exception as e:  # every failure is a test failure; keep going to count them all
                    result.failures.append(f"prompt {k}: {type(e).__name__}: {e}")
                i += streams

    await asyncio.gather(*[client_loop(w) for w in range(streams)])
    return result
