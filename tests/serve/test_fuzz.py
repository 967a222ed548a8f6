"""Bad input, systematically: hypothesis sends the real head (the `api` fixture) every kind of malformed request
over real HTTP, and what a client sees is always a 200 or a 4xx with an OpenAI error body, never a 5xx; afterwards
the server still answers a greedy reference request with exactly the text it gave before.

Bodies for /v1/completions and /v1/chat/completions start from a valid request and are mutated: every known field
(and unknown ones) set to values of any JSON type, numbers at and past their bounds, wrong nesting, huge strings,
fields removed. Raw bodies add bad JSON, invalid UTF-8, the wrong content type; a third test varies methods, paths
and headers. The admin routes that change the cluster are never sent anything. Valid requests are kept cheap
(a few new tokens, at most 8 choices): the point is the API's input handling, not the engine's speed.

The explicit cases at the end pin down what the fuzzing only samples: the context window (a 400, never clamped,
like vLLM), huge max_tokens, invalid UTF-8, a JSON body under another content type, a client that goes away while
sending its body.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import time
import typing
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlparse

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eep_hpc.serve.openai_protocol import ChatCompletionRequest, CompletionRequest
from support import metric, wait_until

TIMEOUT = 120.0
CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MODEL = "eep-tiny-moe"  # the tiny model's name; a request naming another model is a 404 either way

# Reproducible in CI: the same examples every run, nothing read from or written to an example database.
FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.fixture(scope="module")
def http(api):
    assert api.model == MODEL
    with httpx.Client(base_url=api.url, timeout=TIMEOUT) as c:
        yield c


# ---- what every answer must look like ------------------------------------------------------------------------


def assert_openai_error(r: httpx.Response) -> dict:
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["type"], str) and err["type"], err
    assert err["param"] is None or isinstance(err["param"], str), err
    assert err["code"] is None or isinstance(err["code"], (str, int)), err
    return err


def check_stream(lines) -> None:
    """An SSE body: `data:` events, each an OpenAI chunk (never an error event), ending with [DONE]."""
    events = [line[len("data: ") :] for line in lines if line]
    assert events and events[-1] == "[DONE]", events[-3:]
    for e in events[:-1]:
        chunk = json.loads(e)
        assert "error" not in chunk, chunk
        assert chunk["object"] in ("text_completion", "chat.completion.chunk"), chunk


def check_completion_body(path: str, r: httpx.Response) -> None:
    body = r.json()
    assert body["object"] == ("text_completion" if path == CMPL else "chat.completion"), body
    assert body["choices"], body
    for c in body["choices"]:
        assert c["finish_reason"] in ("length", "stop"), c
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


@dataclass
class Sent:
    method: str
    path: str
    content: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __repr__(self) -> str:  # hypothesis prints the falsifying example; keep huge bodies readable
        body = self.content if self.content is None or len(self.content) < 400 else self.content[:400] + b"..."
        return f"Sent({self.method} {self.path!r}, headers={self.headers}, content={body!r})"


def changes_the_cluster(method: str, path: str) -> bool:
    return method != "GET" and "admin" in unquote(path).lower()


def send_and_check(http: httpx.Client, req: Sent) -> int:
    """Send one request and assert what the client sees; returns the status."""
    assert not changes_the_cluster(req.method, req.path), "never fuzz the cluster's admin actions"
    with http.stream(req.method, req.path, content=req.content, headers=req.headers) as r:
        status = r.status_code
        assert status < 500, (status, r.read()[:2000])
        ctype = r.headers.get("content-type", "")
        if req.method == "HEAD":
            r.read()
        elif status >= 400:
            r.read()
            assert ctype.startswith("application/json"), (status, ctype, r.text[:500])
            assert_openai_error(r)
        elif ctype.startswith("text/event-stream"):
            assert req.path in (CMPL, CHAT)
            check_stream(r.iter_lines())
        else:
            r.read()
            if req.method == "POST" and req.path in (CMPL, CHAT):
                check_completion_body(req.path, r)
    return status


# ---- strategies ----------------------------------------------------------------------------------------------

EDGE_INTS = [0, 1, -1, 2, 4, 20, 21, 128, 129, 511, 512, 2047, 2048, 2049, 2**31 - 1, 2**31, 2**53 + 1,
             2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30, -(10**30)]  # fmt: skip
EDGE_FLOATS = [0.0, -0.0, 0.5, 1.0, 1.5, 2.0, 2.0000001, -1e-9, 1e-300, 5e-324, 1e308, -1e308, math.nan,
               math.inf, -math.inf]  # fmt: skip
SPECIAL_TEXT = ["", " ", "\x00", "\n", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "\ufffd", "\U0001f600",
                "\u202e", "{{ raise_exception('boom') }}", "{% for %}", MODEL, "text", "user", "assistant",
                "system", "tool", "none", "auto", "function", "image_url", "json_object"]  # fmt: skip

short_text = st.text(max_size=12) | st.sampled_from(SPECIAL_TEXT)
# Huge strings are built by repetition: drawing 100k characters one by one would make hypothesis itself slow.
huge_text = st.builds(lambda s, k: s * k, st.text(min_size=1, max_size=3), st.sampled_from([700, 3000, 30_000]))
texts = short_text | huge_text
ints = st.integers() | st.sampled_from(EDGE_INTS)
floats = st.floats() | st.sampled_from(EDGE_FLOATS)
scalars = st.none() | st.booleans() | ints | floats | texts
any_json = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(short_text, inner, max_size=4), max_leaves=10
)

token_ids = st.lists(st.integers(0, 511) | st.sampled_from(EDGE_INTS), min_size=0, max_size=8) | st.builds(
    lambda t, k: [t] * k, st.integers(0, 511), st.sampled_from([2046, 2047, 2048, 5000])
)
prompts = (
    texts
    | token_ids
    | st.lists(texts, max_size=4)
    | st.lists(token_ids, max_size=3)
    | st.lists(texts | token_ids | any_json, max_size=3)
    | any_json
)

roles = st.sampled_from(["system", "developer", "user", "assistant", "tool"]) | short_text
content_parts = st.lists(
    st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "input_audio"]) | short_text, "text": texts})
    | any_json,
    max_size=3,
)
tool_calls = st.lists(
    st.fixed_dictionaries(
        {"id": short_text, "type": st.just("function"),
         "function": st.fixed_dictionaries({"name": short_text, "arguments": short_text | any_json})}
    )
    | any_json,
    max_size=2,
)  # fmt: skip
messages = st.lists(
    st.fixed_dictionaries(
        {"role": roles, "content": texts | st.none() | content_parts | any_json},
        optional={"name": short_text | any_json, "tool_calls": tool_calls, "tool_call_id": short_text,
                  "extra": any_json},
    )
    | any_json,
    max_size=4,
)  # fmt: skip
budget = st.sampled_from([-1, 0, 1, 2, 3, 4, 2048, 2049, 10**6, 2**63, 10**30, None]) | any_json

# Values a field may well take (so that many requests get past validation into generation) ...
PLAUSIBLE = {
    "model": st.sampled_from([MODEL, None]),
    "prompt": short_text | st.lists(st.integers(0, 511), min_size=1, max_size=8) | st.lists(short_text, max_size=3),
    "messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": short_text}),
        min_size=1,
        max_size=3,
    ),
    "max_tokens": st.integers(1, 4) | st.none(),
    "max_completion_tokens": st.integers(1, 4) | st.none(),
    "min_tokens": st.integers(0, 4),
    "n": st.integers(1, 4),
    "best_of": st.none() | st.integers(1, 4),
    "temperature": st.floats(0, 2) | st.just(0),
    "top_p": st.floats(0, 1, exclude_min=True),
    "top_k": st.sampled_from([-1, 0, 1, 2, 50, 511, 512, 2**31 - 1]),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": short_text | st.lists(short_text, max_size=3),
    "stop_token_ids": st.lists(st.integers(0, 511), max_size=4),
    "logprobs": st.integers(0, 20) | st.booleans(),
    "top_logprobs": st.integers(0, 20),
    "presence_penalty": st.floats(-2, 2) | st.integers(-2, 2),
    "frequency_penalty": st.floats(-2, 2) | st.integers(-2, 2),
    "repetition_penalty": st.floats(0, 4, exclude_min=True) | st.just(1),
    "logit_bias": st.just({}),
    "stream_options": st.fixed_dictionaries(
        {}, optional={"include_usage": st.booleans(), "continuous_usage_stats": st.booleans()}
    ),
    "suffix": st.sampled_from(["", None]),
    "tool_choice": st.sampled_from(["none", None]),
    "response_format": st.just({"type": "text"}),
    "chat_template_kwargs": st.fixed_dictionaries({}, optional={"enable_thinking": st.booleans()}),
    "tools": st.lists(
        st.fixed_dictionaries(
            {
                "type": st.just("function"),
                "function": st.fixed_dictionaries(
                    {"name": short_text, "parameters": st.just({"type": "object", "properties": {}})}
                ),
            }
        ),
        max_size=2,
    ),
}
# ... and values it should not (wrong types come from any_json for every field).
FIELD_VALUES = {
    "prompt": prompts,
    "messages": messages,
    "max_tokens": budget,
    "max_completion_tokens": budget,
    "min_tokens": budget,
    "n": budget,
    "best_of": budget,
    "stop": texts | st.lists(texts, max_size=4),
    "stop_token_ids": token_ids,
    "temperature": floats | ints,
    "top_p": floats | ints,
    "top_k": ints,
    "seed": ints,
    "logprobs": ints,
    "top_logprobs": ints,
}
FIELDS = {
    CMPL: sorted(CompletionRequest.model_fields),
    CHAT: sorted(ChatCompletionRequest.model_fields),
}
UNKNOWN_FIELDS = ["foo", "", "Prompt", "max_tokens ", "__proto__", "x" * 300, "\x00"]
BASE = {
    CMPL: {"model": MODEL, "prompt": "The capital of", "max_tokens": 3, "temperature": 0},
    CHAT: {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0},
}


def plausible(name: str, path: str) -> st.SearchStrategy:
    if name in PLAUSIBLE:
        return PLAUSIBLE[name]
    info = (CompletionRequest if path == CMPL else ChatCompletionRequest).model_fields.get(name)
    if info is not None and bool in typing.get_args(info.annotation):
        return st.booleans() | st.none()
    return short_text  # user, unknown fields


def hostile(name: str) -> st.SearchStrategy:
    return st.one_of(FIELD_VALUES[name], any_json) if name in FIELD_VALUES else any_json


def bounded(path: str, body) -> object:
    """Keep a request that may be valid cheap: a few new tokens per choice (a max_tokens of None would mean the
    whole context window), at most 8 choices."""
    if not isinstance(body, dict):
        return body
    for key in ("max_tokens", "max_completion_tokens"):
        v = body.get(key)
        if type(v) is int and 4 < v < 2048:
            body[key] = 4
    if path == CMPL and body.get("max_tokens", 0) is None:
        body["max_tokens"] = 4
    if path == CHAT and body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = 4
    for key in ("n", "best_of"):
        v = body.get(key)
        if type(v) is int and 8 < v <= 128:
            body[key] = 8
    return body


def mutate_somewhere(draw, value, depth: int = 0):
    """Replace one node below the top of the JSON tree (or wrap it in a list or an object, or drop a key of it):
    wrong nesting anywhere. (A body that is not an object at all is one of raw_requests' cases.)"""
    if depth < 4 and isinstance(value, (dict, list)) and value and (depth == 0 or draw(st.booleans())):
        if isinstance(value, dict):
            key = draw(st.sampled_from(sorted(value)))
            return {**value, key: mutate_somewhere(draw, value[key], depth + 1)}
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + [mutate_somewhere(draw, value[i], depth + 1)] + value[i + 1 :]
    how = draw(st.sampled_from(["replace", "list", "object", "drop"]))
    if how == "list":
        return [value]
    if how == "object":
        return {draw(short_text): value}
    if how == "drop" and isinstance(value, dict) and value:
        key = draw(st.sampled_from(sorted(value)))
        return {k: v for k, v in value.items() if k != key}
    return draw(any_json)


@st.composite
def json_bodies(draw, path: str):
    body = dict(BASE[path])
    mean = draw(st.booleans())  # else every field set is one a client could well send
    for name in draw(st.lists(st.sampled_from(FIELDS[path] + UNKNOWN_FIELDS), max_size=8, unique=True)):
        body[name] = draw(hostile(name) if mean else plausible(name, path))
    for name in draw(st.lists(st.sampled_from(sorted(body)), max_size=2, unique=True)):
        body.pop(name, None)
    if draw(st.booleans()):
        body = mutate_somewhere(draw, body)
    return bounded(path, body)


@st.composite
def api_requests(draw):
    path = draw(st.sampled_from([CMPL, CHAT]))
    body = draw(json_bodies(path))
    if isinstance(body, dict) and draw(st.integers(0, 3)) == 0:
        body["stream"] = True
        if draw(st.booleans()):
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": draw(st.booleans())}
    content = json.dumps(body).encode()  # NaN and Infinity as the bare literals Python's json writes
    return Sent("POST", path, content, {"content-type": "application/json"})


INVALID_UTF8 = [b"\xff", b"\xfe\xff", b"\xc3", b"\xc3\x28", b"\xe2\x82", b"\xed\xa0\x80", b"\xc0\xaf",
                b"\xf8\x88\x80\x80\x80", b"\xf4\x90\x80\x80", b"\x80"]  # fmt: skip
CONTENT_TYPES = [None, "application/json", "application/json; charset=utf-8", "text/plain",
                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/octet-stream",
                 "application/json; charset=latin-1", "application/json; charset=utf-16", ";;;"]  # fmt: skip


@st.composite
def raw_requests(draw):
    path = draw(st.sampled_from([CMPL, CHAT]))
    valid = json.dumps(BASE[path]).encode()
    kinds = ["valid", "bytes", "utf8", "utf8_in_string", "truncated", "top_level", "literal", "encoded"]
    kind = draw(st.sampled_from(kinds))
    if kind == "valid":  # under any content type: curl -d sends application/x-www-form-urlencoded
        content = valid
    elif kind == "bytes":
        content = draw(st.binary(max_size=300))
    elif kind == "utf8":  # invalid UTF-8 anywhere in an otherwise valid body
        at = draw(st.integers(0, len(valid)))
        content = valid[:at] + draw(st.sampled_from(INVALID_UTF8)) + valid[at:]
    elif kind == "utf8_in_string":  # inside the prompt or the message text
        needle = b'"The capital of"' if path == CMPL else b'"Hi"'
        content = valid.replace(needle, b'"a' + draw(st.sampled_from(INVALID_UTF8)) + b'b"')
    elif kind == "truncated":
        content = valid[: draw(st.integers(0, len(valid) - 1))]
    elif kind == "top_level":
        content = json.dumps(draw(any_json)).encode()
    elif kind == "literal":
        content = draw(st.sampled_from([
            b"", b"{}", b"null", b"[]", b'"prompt"', b"{" * 5000, b"[" * 100_000, b'{"prompt": "a", "prompt": 5}',
            b'{"prompt": "a",}', b"{'prompt': 'a'}", b'{"prompt": "\\ud800", "max_tokens": 2}',
            b'{"prompt": "a", "max_tokens": 1' + b"0" * 5000 + b"}", b'{"prompt": "a", "temperature": 1e999}',
            b'\xef\xbb\xbf{"prompt": "a", "max_tokens": 2}', b'{"prompt": "a"}garbage', b"\x00" * 64,
        ]))  # fmt: skip
    else:  # the right body in the wrong encoding
        content = json.dumps(BASE[path], ensure_ascii=False).encode(draw(st.sampled_from(["utf-16", "utf-32"])))
    ctype = draw(st.sampled_from(CONTENT_TYPES))
    return Sent("POST", path, content, {} if ctype is None else {"content-type": ctype})


@st.composite
def route_requests(draw):
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"]))
    segment = quote(draw(st.text(max_size=20)), safe="")
    path = draw(st.sampled_from([CMPL, CHAT, "/v1/models", "/v1/models/", "/health", "/metrics", "/admin/state",
                                 "/v1/", "/", "/v1/models/" + segment, "/v1/" + segment, "/" + segment]))  # fmt: skip
    if changes_the_cluster(method, path):
        method = "GET"
    content = draw(st.none() | st.binary(max_size=100) | any_json.map(lambda v: json.dumps(v).encode()))
    headers = draw(st.dictionaries(
        st.sampled_from(["content-type", "accept", "authorization", "x-request-id", "accept-encoding", "user-agent"]),
        st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=30), max_size=3,
    ))  # fmt: skip
    return Sent(method, path, content if method not in ("GET", "HEAD") else None, headers)


# ---- the server stays healthy --------------------------------------------------------------------------------


def reference(http: httpx.Client) -> list[str]:
    """Greedy texts of one completion and one chat request (the tiny model is deterministic)."""
    a = http.post(CMPL, json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
    b = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}],
                              "max_tokens": 12, "temperature": 0})  # fmt: skip
    assert a.status_code == 200 and b.status_code == 200, (a.text, b.text)
    return [a.json()["choices"][0]["text"], b.json()["choices"][0]["message"]["content"]]


def kv_blocks_used(api) -> list[int]:
    return [r["kv_blocks_used"] for r in api.state()["ranks"]]


def assert_healthy(api, http: httpx.Client, texts_before: list[str]) -> None:
    assert http.get("/health").status_code == 200
    assert reference(http) == texts_before
    assert all(r["state"] == "READY" for r in api.state()["ranks"]), api.state()["ranks"]
    end = time.monotonic() + 30
    while any(kv_blocks_used(api)) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(kv_blocks_used(api)), "KV blocks still held after every request ended"


@pytest.fixture
def server_errors(caplog):
    """ERROR records the head logs while the test runs (an unhandled exception, a failed stream, …)."""
    for name in ("eep_hpc", "uvicorn.error"):  # uvicorn logs what escapes the app
        caplog.set_level(logging.ERROR, logger=name)
    yield lambda: [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


def fuzz(api, http, server_errors, strategy, examples: int) -> dict[int, int]:
    before = reference(http)
    statuses: dict[int, int] = {}

    @settings(FUZZ, max_examples=examples)
    @given(strategy)
    def run(req: Sent) -> None:
        status = send_and_check(http, req)
        statuses[status] = statuses.get(status, 0) + 1

    run()
    assert not server_errors(), server_errors()
    assert_healthy(api, http, before)
    return statuses


def test_fuzzed_json_bodies_get_200_or_an_openai_4xx(api, http, server_errors):
    statuses = fuzz(api, http, server_errors, api_requests(), 250)
    # The mutations are not all refused: both valid requests and many kinds of 4xx were seen.
    assert statuses.get(200, 0) >= 10 and statuses.get(400, 0) >= 50, statuses


def test_fuzzed_raw_bodies_get_200_or_an_openai_4xx(api, http, server_errors):
    statuses = fuzz(api, http, server_errors, raw_requests(), 120)
    assert statuses.get(400, 0) >= 50 and statuses.get(200, 0) >= 5, statuses


def test_fuzzed_methods_paths_and_headers_get_no_5xx(api, http, server_errors):
    statuses = fuzz(api, http, server_errors, route_requests(), 120)
    assert {404, 405} <= set(statuses), statuses


# ---- the edge cases, one by one ------------------------------------------------------------------------------


def max_model_len(http: httpx.Client) -> int:
    return http.get("/v1/models").json()["data"][0]["max_model_len"]


def test_prompt_past_the_context_window_is_a_400_that_says_so(api, http):
    limit = max_model_len(http)
    long_text = "word " * limit  # more tokens than the window holds
    r = http.post(CMPL, json={"model": MODEL, "prompt": long_text, "max_tokens": 1})
    err = assert_openai_error(r)
    assert r.status_code == 400 and err["param"] == "prompt" and err["type"] == "invalid_request_error", err
    assert f"maximum context length is {limit} tokens" in err["message"]
    assert "Please reduce the length of the prompt" in err["message"]

    r = http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 1})
    err = assert_openai_error(r)
    assert r.status_code == 400 and err["param"] == "messages", err
    assert f"maximum context length is {limit} tokens" in err["message"]

    # The boundary, like vLLM: prompt + max_tokens may fill the window exactly, not one token more.
    ok = http.post(CMPL, json={"model": MODEL, "prompt": [7] * (limit - 1), "max_tokens": 1, "temperature": 0})
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"] == {"prompt_tokens": limit - 1, "completion_tokens": 1, "total_tokens": limit}
    r = http.post(CMPL, json={"model": MODEL, "prompt": [7] * (limit - 1), "max_tokens": 2})
    assert r.status_code == 400 and assert_openai_error(r)["param"] == "max_tokens", r.text
    r = http.post(CMPL, json={"model": MODEL, "prompt": [7] * limit, "max_tokens": 1})
    assert r.status_code == 400 and assert_openai_error(r)["param"] == "prompt", r.text


@pytest.mark.parametrize("huge", [2**31, 2**63, 2**64, 10**30])
def test_huge_max_tokens_is_a_400_naming_the_field_sent(api, http, huge):
    """vLLM refuses prompt + max_tokens > max_model_len rather than clamping; so do we, for any size of number."""
    limit = max_model_len(http)
    msgs = [{"role": "user", "content": "Hi"}]
    for path, body, param in [
        (CMPL, {"prompt": "Hi", "max_tokens": huge}, "max_tokens"),
        (CHAT, {"messages": msgs, "max_tokens": huge}, "max_tokens"),
        (CHAT, {"messages": msgs, "max_completion_tokens": huge}, "max_completion_tokens"),
        (CHAT, {"messages": msgs, "max_tokens": 1, "max_completion_tokens": huge}, "max_completion_tokens"),
    ]:
        r = http.post(path, json={"model": MODEL, **body})
        err = assert_openai_error(r)
        assert r.status_code == 400 and err["param"] == param, (path, body, err)
        assert f"maximum context length is {limit} tokens" in err["message"], err


@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_invalid_utf8_body_is_a_400_that_says_so(api, http, path):
    valid = json.dumps(BASE[path]).encode()
    needle = b'"The capital of"' if path == CMPL else b'"Hi"'
    for bad in (b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf"):
        for content in (valid.replace(needle, b'"caf' + bad + b'"'), valid[:-1] + b", " + bad + b"}"):
            r = http.post(path, content=content, headers={"content-type": "application/json"})
            err = assert_openai_error(r)
            assert r.status_code == 400 and err["type"] == "invalid_request_error", err
            assert "not valid UTF-8" in err["message"], err
    # Text in another encoding, announced or not, is not JSON either (RFC 8259: UTF-8).
    latin1 = json.dumps({**BASE[path], "user": "café"}, ensure_ascii=False).encode("latin-1")
    r = http.post(path, content=latin1, headers={"content-type": "application/json; charset=latin-1"})
    assert r.status_code == 400 and "not valid UTF-8" in assert_openai_error(r)["message"], r.text


@pytest.mark.parametrize("ctype", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_json_body_under_another_content_type_is_served(api, http, ctype):
    """`curl -d '{...}'` without -H sends application/x-www-form-urlencoded: the body is still JSON."""
    body = json.dumps({**BASE[CMPL], "max_tokens": 4}).encode()
    want = http.post(CMPL, json={**BASE[CMPL], "max_tokens": 4}).json()["choices"][0]["text"]
    r = http.post(CMPL, content=body, headers={} if ctype is None else {"content-type": ctype})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want


def http_status_counts(http: httpx.Client, route: str) -> dict[str, float]:
    """/metrics: eep_hpc:http_requests_total of one route, by status."""
    out: dict[str, float] = {}
    for line in http.get("/metrics").text.splitlines():
        if line.startswith("eep_hpc:http_requests_total{") and f'route="{route}"' in line:
            status = line.split('status="')[1].split('"')[0]
            out[status] = out.get(status, 0) + float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize("path", [CMPL, CHAT])
def test_client_gone_while_sending_its_body_is_no_server_error(api, http, server_errors, path):
    """A client that announces a body and leaves half way: no 5xx in /metrics, nothing logged as an error, and the
    server serves the next request."""
    url = urlparse(api.url)

    def in_progress() -> float:  # HTTP requests being served, the /metrics request that asks included
        return metric(api.url, "eep_hpc:http_requests_in_progress")

    for partial in (b'{"prompt": "ab', b'{"messages": [{"role": "user", "content": "Hi"'):
        before, idle = http_status_counts(http, path), in_progress()
        with socket.create_connection((url.hostname, url.port), timeout=10) as s:
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
                      + f"Content-Length: {len(partial) + 100}\r\n\r\n".encode() + partial)  # fmt: skip
            wait_until(lambda: in_progress() > idle, 10, "the server reading the request's body")
        # the client is gone: its request ends as nginx's "client closed request", and nothing else is counted
        after = wait_until(lambda: (c := http_status_counts(http, path)).get("499", 0) > before.get("499", 0) and c,
                           10, "a 499 for the request whose client left")
        assert after.get("499", 0) == before.get("499", 0) + 1, (before, after)
        assert after.get("500", 0) == before.get("500", 0), (before, after)
        wait_until(lambda: in_progress() == idle, 10, "the server done with the request")
    assert not server_errors(), server_errors()
    assert http.post(CMPL, json={**BASE[CMPL], "max_tokens": 2}).status_code == 200
