"""A stream whose writer falls behind its tokens gets them merged into fewer SSE events (serve/output_queue.py), and
the client reads exactly what a non-streamed request returns: the same text, logprobs entries and usage.

The backlog is made by holding the head's event loop (the `api` fixture's head runs in a thread of the test
process) for a second mid-stream: the rank keeps stepping, and its outputs wait for the loop.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

MAX_TOKENS = 48
HOLD_S = 1.0
TOL = 2e-4


def hold_the_loop() -> None:  # runs on the head's event loop: no stream is written meanwhile
    start = time.monotonic()
    while time.monotonic() - start < HOLD_S:
        pass


def streamed_behind(api, path: str, body: dict, **stream_options) -> list[dict]:
    """The chunks of a streamed request whose head is held up after its second chunk."""
    chunks = []
    options = {"include_usage": True, **stream_options}
    with httpx.stream("POST", f"{api.url}{path}", json={**body, "stream": True, "stream_options": options},
                      timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                return chunks
            chunks.append(json.loads(line[6:]))
            assert "error" not in chunks[-1], chunks[-1]
            if len(chunks) == 2:
                api.loop.call_soon_threadsafe(hold_the_loop)
    raise AssertionError("no [DONE]")


@pytest.mark.parametrize("logprobs, continuous_usage", [(2, False), (None, True), (None, False)],
                         ids=["logprobs", "continuous-usage", "plain-text"])
def test_completion_stream_behind_its_tokens_reads_as_the_whole_response(api, logprobs, continuous_usage):
    """Per-token logprobs entries, or the usage of every chunk (continuous_usage_stats), show how many tokens each
    event carried; plain text chunks (framed from a template) show only their text."""
    body = {"model": api.model, "prompt": "The history of the", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "logprobs": logprobs}
    whole = httpx.post(f"{api.url}/v1/completions", json=body, timeout=120).json()
    chunks = streamed_behind(api, "/v1/completions", body, continuous_usage_stats=continuous_usage)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in choices) == whole["choices"][0]["text"]
    assert chunks[-1]["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] == MAX_TOKENS
    assert choices[-1]["finish_reason"] == "length"
    if continuous_usage:
        counts = [c["usage"]["completion_tokens"] for c in chunks]
        # one token per event while the writer keeps up (a few where tokens make no text yet: 3 at most here)
        assert max(b - a for a, b in zip(counts, counts[1:])) > 4, "the held-up tokens should share events"
    if logprobs is None:
        assert all(c["logprobs"] is None for c in choices)
        return
    want = whole["choices"][0]["logprobs"]
    got = {k: [v for c in choices if c["logprobs"] for v in c["logprobs"][k]] for k in want}
    assert got == want
    assert max(len(c["logprobs"]["tokens"]) for c in choices if c["logprobs"]) > 1, \
        "the held-up tokens should share events"


def test_chat_stream_behind_its_tokens_reads_as_the_whole_response(api):
    body = {"model": api.model, "messages": [{"role": "user", "content": "Tell me a story."}],
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    whole = httpx.post(f"{api.url}/v1/chat/completions", json=body, timeout=120).json()
    chunks = streamed_behind(api, "/v1/chat/completions", body)
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["delta"].get("content") or "" for c in choices) == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["usage"] == whole["usage"]
    entries = [e for c in choices if c.get("logprobs") for e in c["logprobs"]["content"]]
    want = whole["choices"][0]["logprobs"]["content"]
    # the same tokens in order; values up to float noise (the repeated chat prompt's KV comes from the prefix cache,
    # computed in other chunks, as in test_logprobs.py)
    assert [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]]) for e in entries] == \
        [(e["token"], e["bytes"], [t["token"] for t in e["top_logprobs"]]) for e in want]
    assert [e["logprob"] for e in entries] == pytest.approx([e["logprob"] for e in want], abs=TOL)
    assert max(len(c["logprobs"]["content"]) for c in choices if c.get("logprobs")) > 1
