"""The two POST routes' requests skip the middleware stack (app.App, hot_routes), and a stream's chunks (its text
chunks' template, its last chunk, chat's first chunk) are made from shapes rendered once per process (Reply.cut),
not by pydantic per request. Neither may change what a client sees: the same requests, valid and not, answered by an
app with both and by one with neither (the middleware stack, pydantic for every chunk) give the same status,
headers and body bytes, and the same HTTP metrics. Ids and creation times are fixed, so the bodies compare whole.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import pytest
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from eep_hpc import protocol as P
from eep_hpc.config import ServeConfig
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.model.tokenizer import Tokenizer
from eep_hpc.serve import app as app_module
from eep_hpc.serve import serving
from eep_hpc.serve.api_proxy import ToHeadMiddleware
from eep_hpc.serve.app import create_app, hot_routes

TEXT = 'Say "hi"\\ to the wörld, ünïcode ✓ done.\nAgain and again: the end.'
KEY = "sk-test"


class ScriptEngine:
    """EngineClient: every request gets the tokens of `script` one output at a time ("length" at max_tokens).
    `ready_error`: ready() raises it (an exception no handler takes); `not_ready`: ready() is False."""

    def __init__(self, tokenizer: Tokenizer, script: list[int]) -> None:
        self.tokenizer, self.model_name, self.max_model_len = tokenizer, "m", 4096
        self.vocab_size = tokenizer.backend.get_vocab_size()
        self.script = script
        self.not_ready = False
        self.ready_error: Exception | None = None

    def ready(self) -> bool:
        if self.ready_error is not None:
            raise self.ready_error
        return not self.not_ready

    def cluster_state(self) -> dict:
        return {}

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: P.SamplingParams):
        for k in range(sampling.max_tokens):
            await asyncio.sleep(0)
            last = k + 1 == sampling.max_tokens
            yield P.RequestOutput(request_id=request_id, new_token_ids=[self.script[k % len(self.script)]],
                                  finish_reason="length" if last else None)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(ensure_tiny_checkpoint())


class Unknown:
    """A middleware the hot routes know nothing of: with it every request takes the stack."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


def make_app(tokenizer, hot: bool, api_key: str = ""):
    engine = ScriptEngine(tokenizer, tokenizer.encode(TEXT, add_special_tokens=False))
    app = create_app(engine, ServeConfig(api_key=api_key))
    if not hot:
        app.add_middleware(Unknown)
    return app, engine


def cases() -> list[tuple[str, str, dict, object]]:
    """(method, path, headers, body: a dict for JSON, bytes as they are)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    prompt = "Once upon a time"
    out = []
    for stream in (False, True):
        s = {"stream": stream}
        out += [
            ("POST", "/v1/completions", auth, {"model": "m", "prompt": prompt, "max_tokens": 12, **s}),
            ("POST", "/v1/completions", auth, {"prompt": [5, 6, 7], "max_tokens": 1, **s}),
            ("POST", "/v1/completions", auth, {"prompt": prompt, "max_tokens": 9, "echo": True, **s}),
            ("POST", "/v1/completions", auth, {"prompt": [prompt, "Hi"], "max_tokens": 5, "n": 2, **s}),
            ("POST", "/v1/completions", auth, {"prompt": prompt, "max_tokens": 30, "stop": ["again"], **s}),
            ("POST", "/v1/completions", auth, {"prompt": prompt, "max_tokens": 30, "stop": ["again"],
                                               "include_stop_str_in_output": True, **s}),
            ("POST", "/v1/completions", auth, {"prompt": prompt, "max_tokens": 4, "logprobs": 2, **s}),
            ("POST", "/v1/chat/completions", auth, {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 10, **s}),
            ("POST", "/v1/chat/completions", auth, {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_completion_tokens": 1, "n": 2, **s}),
            ("POST", "/v1/chat/completions", auth, {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 30, "stop": "again", **s}),
        ]
    for usage in ({"include_usage": True}, {"continuous_usage_stats": True},
                  {"include_usage": True, "continuous_usage_stats": True}):
        out += [
            ("POST", "/v1/completions", auth, {"prompt": prompt, "max_tokens": 6, "stream": True,
                                               "stream_options": usage}),
            ("POST", "/v1/chat/completions", auth, {"messages": [{"role": "user", "content": "Hi"}],
                                                    "max_tokens": 6, "stream": True, "stream_options": usage}),
        ]
    out += [  # refused: the same 4xx JSON either way
        ("POST", "/v1/completions", auth, b"{not json"),
        ("POST", "/v1/completions", auth, b"\xff\xfe{}"),
        ("POST", "/v1/completions", auth, b""),
        ("POST", "/v1/completions", auth, b"[1, 2]"),
        ("POST", "/v1/completions", auth, {"prompt": prompt, "max_tokens": "12"}),
        ("POST", "/v1/completions", auth, {"prompt": prompt, "n": 0, "temperature": 9, "stream": 1}),
        ("POST", "/v1/completions", auth, {"max_tokens": 3}),
        ("POST", "/v1/completions", auth, {"prompt": [], "max_tokens": 3}),
        ("POST", "/v1/completions", auth, {"prompt": [5, 10 ** 9], "max_tokens": 3}),
        ("POST", "/v1/completions", auth, {"prompt": prompt, "max_tokens": 5000}),
        ("POST", "/v1/completions", auth, {"prompt": prompt, "stream_options": {"include_usage": True}}),
        ("POST", "/v1/completions", auth, {"prompt": prompt, "suffix": "x", "best_of": 3, "logit_bias": {"1": 2}}),
        ("POST", "/v1/completions", auth, {"model": "other", "prompt": prompt}),
        ("POST", "/v1/chat/completions", auth, {"messages": []}),
        ("POST", "/v1/chat/completions", auth, {"messages": [{"role": "robot", "content": "Hi"}]}),
        ("POST", "/v1/chat/completions", auth, {"messages": [{"role": "user", "content": [{"type": "image"}]}]}),
        ("POST", "/v1/chat/completions", auth, {"messages": [{"role": "user", "content": "Hi"}],
                                                "tool_choice": "auto", "top_logprobs": 2}),
        ("POST", "/v1/completions", {}, {"prompt": prompt}),  # no key
        ("POST", "/v1/completions", {"Authorization": "Bearer wrong"}, {"prompt": prompt}),
        ("POST", "/v1/chat/completions", {"Authorization": "Basic " + KEY}, {"messages": []}),
        ("GET", "/v1/completions", auth, None),  # not the hot routes' own: the stack either way
        ("POST", "/v1/completions/", auth, {"prompt": prompt}),
        ("POST", "/v1/models", auth, {}),
        ("GET", "/v1/models", auth, None),
    ]
    return out


async def answers(app, engine, requests, special: bool = True) -> tuple[list, list[str]]:
    got = []
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for method, path, headers, body in requests:
            kw = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
            r = await client.request(method, path, headers=headers, **kw)
            got.append((method, path, r.status_code, r.headers.multi_items(), r.content))
        if special:  # the engine not ready (503), then failing where nothing handles it (a logged 500)
            auth = {"Authorization": f"Bearer {KEY}"}
            for setting in ("not_ready", "ready_error"):
                setattr(engine, setting, True if setting == "not_ready" else RuntimeError("boom"))
                r = await client.post("/v1/completions", headers=auth, json={"prompt": "Hi", "stream": True})
                got.append((setting, r.status_code, r.headers.multi_items(), r.content))
                setattr(engine, setting, False if setting == "not_ready" else None)
        metrics = (await client.get("/metrics")).text
    http = [line for line in metrics.splitlines()
            if line.startswith(("eep_hpc:http_requests", "eep_hpc:request_success", "eep_hpc:num_requests",
                                "eep_hpc:generation_tokens", "eep_hpc:prompt_tokens"))
            and "_created" not in line]
    return got, http


@pytest.fixture
def fixed_ids(monkeypatch):
    ids = iter(range(10 ** 6))
    monkeypatch.setattr(serving, "random_id", lambda prefix: f"{prefix}-{next(ids):032x}")
    monkeypatch.setattr(serving, "now", lambda: 1_700_000_000)
    # the model card's "created" is when its app was made: the two apps below may be a second apart
    monkeypatch.setattr(app_module, "time", SimpleNamespace(time=lambda: 1_700_000_000.0))

    def reset():
        nonlocal ids
        ids = iter(range(10 ** 6))

    return reset


@pytest.mark.parametrize("api_key", ["", KEY])
def test_hot_routes_answer_as_the_stack_does(tokenizer, fixed_ids, monkeypatch, api_key):
    hot_app, hot_engine = make_app(tokenizer, hot=True, api_key=api_key)
    serving._shapes.clear()
    fast, fast_metrics = asyncio.run(answers(hot_app, hot_engine, cases()))
    assert hot_app._hot is not None  # the hot routes were taken
    assert any(v is not None for k, v in serving._shapes.items() if k[3] == ("finish", True))
    assert any(v is not None for k, v in serving._shapes.items() if k[3] == ("first",))

    fixed_ids()
    stack_app, stack_engine = make_app(tokenizer, hot=False, api_key=api_key)
    monkeypatch.setattr(serving, "_cut", lambda rendered, slots: None)  # every chunk made by pydantic
    serving._shapes.clear()
    slow, slow_metrics = asyncio.run(answers(stack_app, stack_engine, cases()))
    assert stack_app._hot is None

    assert len(fast) == len(slow)
    for a, b in zip(fast, slow):
        assert a == b
    assert fast_metrics == slow_metrics
    statuses = {a[2] if len(a) == 5 else a[1] for a in fast}
    assert {200, 400, 404, 405, 500, 503} <= statuses and (401 in statuses) == bool(api_key)
    serving._shapes.clear()


def test_chunk_shapes_are_the_pydantic_chunks_of_each_request(tokenizer, fixed_ids, monkeypatch):
    """Shapes made by one request serve the next ones (other ids); the stack's app makes its chunks with pydantic."""
    streams = [c for c in cases() if isinstance(c[3], dict) and c[3].get("stream") is True]
    app, engine = make_app(tokenizer, hot=True)
    serving._shapes.clear()
    first, _ = asyncio.run(answers(app, engine, streams + streams, special=False))
    fixed_ids()
    monkeypatch.setattr(serving, "_cut", lambda rendered, slots: None)
    app, engine = make_app(tokenizer, hot=True)
    again, _ = asyncio.run(answers(app, engine, streams + streams, special=False))
    assert first == again
    assert all(a[2] == 200 and a[4].endswith(b"data: [DONE]\n\n") for a in first)
    serving._shapes.clear()


def test_hot_routes_found_whichever_request_builds_the_stack(tokenizer):
    """A GET first (the head's readiness checks) builds the stack: the POSTs after it still take the hot routes."""
    app, engine = make_app(tokenizer, hot=True)

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            assert (await client.get("/health")).status_code == 200
            assert app._hot is not None
            r = await client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
            assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")

    asyncio.run(go())


def test_hot_routes_only_under_the_stack_create_app_builds(tokenizer):
    app, _ = make_app(tokenizer, hot=True)
    app.middleware_stack = app.build_middleware_stack()
    assert set(hot_routes(app)) == {"/v1/completions", "/v1/chat/completions"}

    app, _ = make_app(tokenizer, hot=True)
    app.add_middleware(ToHeadMiddleware, head_url="http://127.0.0.1:9")  # passes the hot paths through
    app.middleware_stack = app.build_middleware_stack()
    assert hot_routes(app) is not None

    app, _ = make_app(tokenizer, hot=True)  # an app-wide root path
    app.root_path = "/api"
    app.middleware_stack = app.build_middleware_stack()
    assert hot_routes(app) is None

    app, _ = make_app(tokenizer, hot=False)  # a middleware it does not know
    app.middleware_stack = app.build_middleware_stack()
    assert hot_routes(app) is None

    app, _ = make_app(tokenizer, hot=True)  # a route added before them takes the path
    app.router.routes.insert(0, Route("/v1/completions", lambda request: None, methods=["POST"]))
    app.middleware_stack = app.build_middleware_stack()
    assert hot_routes(app) is None


def test_response_ids_read_as_uuid4_and_a_forked_child_draws_its_own():
    import os
    import uuid

    from eep_hpc.serve.openai_protocol import random_id

    ids = [random_id("cmpl") for _ in range(3000)]  # several refills of the buffer
    assert len(set(ids)) == len(ids)
    for i in ids:
        prefix, _, hex_ = i.partition("-")
        u = uuid.UUID(hex_)
        assert prefix == "cmpl" and u.hex == hex_ and u.version == 4 and u.variant == uuid.RFC_4122
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, random_id("x").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 100).decode() != random_id("x")


@pytest.mark.parametrize("messages", [
    [{"type": "http.request", "body": b'{"a": 1}'}],
    [{"type": "http.request", "body": b'{"a"', "more_body": True}, {"type": "http.request", "body": b"",
                                                                      "more_body": True},
     {"type": "http.request", "body": b': 1}', "more_body": False}],
    [{"type": "http.request"}],
    [{"type": "http.request", "body": b'{"a"', "more_body": True}, {"type": "http.disconnect"}],
])
def test_read_body_reads_what_request_body_reads(messages):
    from starlette.requests import ClientDisconnect, Request

    async def outcome(read) -> object:
        queue = list(messages)

        async def receive():
            return queue.pop(0)

        request = Request({"type": "http", "method": "POST", "path": "/", "headers": []}, receive)
        try:
            body = await read(request)
        except ClientDisconnect:
            return "disconnect"
        return body, await request.body(), queue  # read again: the same bytes, nothing more received

    assert asyncio.run(outcome(serving.read_body)) == asyncio.run(outcome(lambda r: r.body()))


def test_the_heads_own_app_takes_its_hot_routes(api):
    """The head's app (admin routes added after create_app, the coordinator as engine) answers its POSTs past the
    stack, and what a client reads is what the stack would send (test_hot_routes_answer_as_the_stack_does)."""
    with httpx.Client(base_url=api.url, timeout=120) as client:
        r = client.post("/v1/completions", json={"model": api.model, "prompt": "Hello", "max_tokens": 3,
                                                 "stream": True})
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert client.post("/v1/completions", json={"prompt": "Hello", "n": 0}).status_code == 400
    app = api.head.app
    assert app._hot is not None and set(app._hot) == {"/v1/completions", "/v1/chat/completions"}
