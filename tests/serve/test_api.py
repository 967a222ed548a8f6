"""The OpenAI-compatible HTTP API, against the real head and ranks (the `api` fixture of conftest.py).

What a client sees: OpenAI-shaped bodies and errors, the same greedy text streamed or not, usage that matches the
tokenizer, stop strings cut, SSE that ends with [DONE], the openai client working, and a client that leaves
mid-stream freeing its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from eep_hpc.serve.stop_strings import StopMatcher
from support import metric, wait_until

TIMEOUT = 120.0


@pytest.fixture(scope="module")
def client(api):
    with httpx.Client(base_url=api.url, timeout=TIMEOUT) as c:
        yield c


def sse_events(lines) -> list[str]:
    """Payloads of `data: ...` events, [DONE] included; asserts the framing."""
    events = []
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: "), line
        events.append(line[len("data: ") :])
    return events


def stream_completion(client: httpx.Client, path: str, body: dict) -> tuple[list[dict], list[str]]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]], events


def streamed_text(chunks: list[dict], chat: bool) -> tuple[str, str | None]:
    text, finish = "", None
    for c in chunks:
        for choice in c["choices"]:
            text += (choice["delta"].get("content") or "") if chat else choice["text"]
            finish = choice["finish_reason"] or finish
    return text, finish


def kv_blocks_used(state: dict) -> list[int]:
    found = []

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "kv_blocks_used" and isinstance(v, int):
                    found.append(v)
                else:
                    walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(state)
    assert found, f"no kv_blocks_used in {state}"
    return found


def wait_kv_free(api, deadline_s: float = 30.0) -> list[int]:
    end = time.monotonic() + deadline_s
    used = kv_blocks_used(api.state())
    while any(used) and time.monotonic() < end:
        time.sleep(0.1)
        used = kv_blocks_used(api.state())
    return used


def aborted_requests(api) -> float:
    """/metrics: engine requests that ended because their client went away."""
    return metric(api.url, "eep_hpc:request_success_total", finished_reason="abort")


def assert_error(r: httpx.Response, status: int, param: str | None = "", type_: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    if param != "":
        assert err["param"] == param, err
    if type_ is not None:
        assert err["type"] == type_, err
    return err


# ---- stop strings (the pure part) ----------------------------------------------------------------------------


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = ""
    for p in pieces:
        out += matcher.feed(p)
        if matcher.matched is not None:
            return out
    return out + matcher.flush()


def test_stop_matcher_across_pieces_and_hold_back():
    m = StopMatcher(["world"])
    assert m.feed("hello wo") == "hello "  # "wo" might start "world"
    assert m.feed("rld!") == ""
    assert m.matched == "world"

    m = StopMatcher(["abc"])
    assert m.feed("xab") == "x"
    assert m.feed("d") == "abd"  # not a stop after all: released
    assert m.flush() == ""

    assert feed_all(StopMatcher(["\n\n", "END"]), ["a\n", "b", "E", "N", "x\n", "\nEND"]) == "a\nbENx"
    assert feed_all(StopMatcher(["bc", "b"]), ["abc"]) == "a"
    assert feed_all(StopMatcher(["o w"], include_stop_in_output=True), ["hell", "o", " ", "world"]) == "hello w"
    assert feed_all(StopMatcher([]), ["a", "b"]) == "ab"
    # Any split of a text gives the same output.
    text = "the cat sat on the mat"
    for cut in range(1, len(text)):
        assert feed_all(StopMatcher(["on t", "xyz"]), [text[:cut], text[cut:]]) == "the cat sat "


# ---- routes --------------------------------------------------------------------------------------------------


def test_models_health_metrics_state(api, client):
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    (card,) = body["data"]
    assert card["id"] == api.model and card["object"] == "model" and card["max_model_len"] > 0
    assert client.get(f"/v1/models/{api.model}").json()["id"] == api.model
    assert_error(client.get("/v1/models/no-such-model"), 404, type_="invalid_request_error")

    assert client.get("/health").status_code == 200

    client.post("/v1/completions", json={"model": api.model, "prompt": "Hi", "max_tokens": 2})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    for name in (
        "eep_hpc:http_requests_total",
        "eep_hpc:prompt_tokens_total",
        "eep_hpc:generation_tokens_total",
        "eep_hpc:time_to_first_token_seconds_bucket",
        "eep_hpc:e2e_request_latency_seconds_bucket",
        "eep_hpc:num_requests_running",
    ):
        assert name in r.text, name
    assert 'route="/v1/completions"' in r.text

    state = client.get("/admin/state")
    assert state.status_code == 200
    kv_blocks_used(state.json())


# ---- errors --------------------------------------------------------------------------------------------------


def error_cases(model: str, max_model_len: int) -> list[tuple[str, str, object, int, str | None]]:
    """(method, path, body (dict = JSON, str = raw), status, param)."""
    cmpl, chat = "/v1/completions", "/v1/chat/completions"
    msgs = [{"role": "user", "content": "hello"}]
    long_prompt = [5] * (max_model_len + 1)
    return [
        ("POST", cmpl, '{"model": "x", "prompt": ', 400, None),
        ("POST", chat, "not json at all", 400, None),
        ("POST", cmpl, "", 400, None),
        ("POST", cmpl, "[1, 2]", 400, None),
        ("POST", cmpl, {"model": "no-such-model", "prompt": "hi"}, 404, "model"),
        ("POST", chat, {"model": "no-such-model", "messages": msgs}, 404, "model"),
        ("POST", cmpl, {"model": model, "prompt": long_prompt, "max_tokens": 1}, 400, "prompt"),
        ("POST", cmpl, {"model": model, "prompt": [5] * 8, "max_tokens": max_model_len}, 400, "max_tokens"),
        ("POST", chat, {"model": model, "messages": msgs, "max_tokens": max_model_len}, 400, "max_tokens"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
        ("POST", chat, {"model": model, "messages": msgs, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "temperature": 2.5}, 400, "temperature"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "top_p": 0}, 400, "top_p"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "top_k": -2}, 400, "top_k"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "max_tokens": "abc"}, 400, "max_tokens"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "seed": "7"}, 400, "seed"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "stream": "yes"}, 400, "stream"),
        ("POST", cmpl, {"model": model, "prompt": 42}, 400, "prompt"),
        ("POST", cmpl, {"model": model, "prompt": ""}, 400, "prompt"),
        ("POST", cmpl, {"model": model, "prompt": []}, 400, "prompt"),
        ("POST", cmpl, {"model": model}, 400, "prompt"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "logprobs": -1}, 400, "logprobs"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "logprobs": True}, 400, "logprobs"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "echo": 1}, 400, "echo"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "frequency_penalty": "1"}, 400, "frequency_penalty"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ("POST", chat, {"model": model, "messages": msgs, "repetition_penalty": -1.0}, 400, "repetition_penalty"),
        ("POST", chat, {"model": model, "messages": msgs, "presence_penalty": -2.01}, 400, "presence_penalty"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "n": 0}, 400, "n"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "stop": 3}, 400, "stop"),
        ("POST", cmpl, {"model": model, "prompt": "hi", "stream_options": {"include_usage": True}}, 400,
         "stream_options"),  # fmt: skip
        ("POST", cmpl, {"model": model, "prompt": "hi", "min_tokens": 20, "max_tokens": 4}, 400, "min_tokens"),
        ("POST", cmpl, {"model": model, "prompt": [1, -3]}, 400, "prompt"),
        ("POST", cmpl, {"model": model, "prompt": [10**9]}, 400, "prompt"),
        ("POST", chat, {"model": model, "messages": "hello"}, 400, "messages"),
        ("POST", chat, {"model": model, "messages": []}, 400, "messages"),
        ("POST", chat, {"model": model}, 400, "messages"),
        ("POST", chat, {"model": model, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ("POST", chat, {"model": model, "messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
        ("POST", chat, {"model": model, "messages": [{"content": "hi"}]}, 400, "messages[0].role"),
        (
            "POST",
            chat,
            {"model": model, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content",
        ),
        ("POST", chat, {"model": model, "messages": msgs, "logprobs": 1}, 400, "logprobs"),
        ("POST", chat, {"model": model, "messages": msgs, "top_logprobs": 2}, 400, "top_logprobs"),
        ("POST", chat, {"model": model, "messages": msgs, "logprobs": False, "top_logprobs": 0}, 400, "top_logprobs"),
        ("POST", chat, {"model": model, "messages": msgs, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
        ("POST", chat, {"model": model, "messages": msgs, "temperature": -1}, 400, "temperature"),
        ("POST", chat, {"model": model, "messages": msgs, "top_p": 0}, 400, "top_p"),
        ("POST", chat, {"model": model, "messages": msgs, "tool_choice": "required"}, 400, "tool_choice"),
        ("POST", chat, {"model": model, "messages": msgs, "response_format": {"type": "json_object"}}, 400,
         "response_format"),  # fmt: skip
        ("POST", "/v1/no-such-route", {"model": model}, 404, None),
        ("GET", "/nothing/here", None, 404, None),
        ("GET", cmpl, None, 405, None),
        ("DELETE", "/v1/models", None, 405, None),
    ]


def test_bad_requests_get_openai_errors_and_harm_no_stream(api, client):
    max_model_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    body = {"model": api.model, "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0, "stream": True}
    # A stream started before the bad requests, read after them.
    with client.stream("POST", "/v1/completions", json=body) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        first = next(line for line in lines if line)
        for method, path, payload, status, param in error_cases(api.model, max_model_len):
            kwargs = {}
            if isinstance(payload, dict):
                kwargs["json"] = payload
            elif isinstance(payload, str):
                kwargs["content"] = payload.encode()
                kwargs["headers"] = {"content-type": "application/json"}
            r = client.request(method, path, **kwargs)
            err = assert_error(r, status, param)
            if status == 400:
                assert err["type"] == "invalid_request_error"
            if path.endswith("/completions") and status == 404:
                assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
        events = sse_events([first, *lines])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("error" not in c for c in chunks)
    assert streamed_text(chunks, chat=False)[1] in ("length", "stop")


def test_error_messages_name_the_problem(api, client):
    max_model_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    r = client.post("/v1/completions", json={"model": api.model, "prompt": [5] * 8, "max_tokens": max_model_len})
    msg = assert_error(r, 400)["message"]
    assert f"maximum context length is {max_model_len} tokens" in msg
    assert f"{max_model_len + 8} tokens (8 in the prompt, {max_model_len} in the completion)" in msg

    msg = assert_error(client.post("/v1/completions", json={"prompt": "x", "temperature": -1}), 400)["message"]
    assert "temperature" in msg and "-1" in msg
    msg = assert_error(client.post("/v1/completions", json={"prompt": "x", "logprobs": 21}), 400)["message"]
    assert "logprobs" in msg and "20" in msg
    msg = assert_error(client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}],
                                                                 "top_logprobs": 3}), 400)["message"]
    assert "top_logprobs" in msg and "logprobs is true" in msg
    msg = assert_error(client.post("/v1/completions", content=b'{"prompt": "x",}'), 400)["message"]
    assert "Invalid JSON" in msg
    r = client.post("/v1/completions", json={"model": "gpt-17", "prompt": "x"})
    assert "gpt-17" in assert_error(r, 404)["message"]


# ---- generation ----------------------------------------------------------------------------------------------


def test_completion_usage_matches_tokenizer(api, client):
    prompt = "Once upon a time, in a land far away,"
    r = client.post("/v1/completions", json={"model": api.model, "prompt": prompt, "max_tokens": 7, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == api.model
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and isinstance(choice["text"], str) and choice["logprobs"] is None
    usage = body["usage"]
    assert usage["prompt_tokens"] == len(api.tokenizer.encode(prompt))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 7
    else:
        assert choice["finish_reason"] == "stop" and 1 <= usage["completion_tokens"] <= 7

    # Token-id prompts are taken as they are.
    ids = api.tokenizer.encode(prompt)
    r = client.post("/v1/completions", json={"model": api.model, "prompt": ids, "max_tokens": 7, "temperature": 0})
    assert r.json()["usage"]["prompt_tokens"] == len(ids)
    assert r.json()["choices"][0]["text"] == choice["text"]


def test_null_max_tokens_means_up_to_the_context_limit(api, client):
    """Left out, completions' max_tokens is OpenAI's default of 16; null means no limit but the context window
    (vLLM's get_max_tokens: max_model_len - prompt tokens), for completions and chat alike."""
    max_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    ids = (api.tokenizer.encode("Once upon a time") * max_len)[: max_len - 20]  # 20 tokens of room left
    body = {"model": api.model, "prompt": ids, "temperature": 0, "ignore_eos": True}
    omitted = client.post("/v1/completions", json=body)
    null = client.post("/v1/completions", json={**body, "max_tokens": None})
    assert omitted.status_code == null.status_code == 200, null.text
    assert omitted.json()["usage"]["completion_tokens"] == 16
    assert null.json()["usage"]["completion_tokens"] == 20 and null.json()["choices"][0]["finish_reason"] == "length"
    long_message = [{"role": "user", "content": "hi " * ((max_len - 60) // 2)}]  # "hi " is 2 tokens
    chat = {"model": api.model, "messages": long_message, "temperature": 0, "ignore_eos": True}
    for nulls in ({}, {"max_tokens": None}, {"max_completion_tokens": None}):
        r = client.post("/v1/chat/completions", json={**chat, **nulls})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] < max_len and usage["total_tokens"] == max_len, (nulls, usage)


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_greedy_same_text_streamed_or_not(api, client, chat):
    if chat:
        path = "/v1/chat/completions"
        body = {"model": api.model, "messages": [{"role": "user", "content": "Tell me a story."}]}
    else:
        path, body = "/v1/completions", {"model": api.model, "prompt": "def fibonacci(n):"}
    body = {**body, "max_tokens": 20, "temperature": 0}
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    whole = r.json()
    (choice,) = whole["choices"]
    text = choice["message"]["content"] if chat else choice["text"]
    if chat:
        assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
        assert choice["message"]["role"] == "assistant"

    chunks, _ = stream_completion(client, path, {**body, "stream_options": {"include_usage": True}})
    *content, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in content)
    assert all(c["id"] == content[0]["id"] for c in content)
    if chat:
        assert content[0]["object"] == "chat.completion.chunk"
        assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    else:
        assert content[0]["object"] == "text_completion"
    assert streamed_text(content, chat) == (text, choice["finish_reason"])
    # Without stream_options there is no usage at all.
    chunks, _ = stream_completion(client, path, body)
    assert all("usage" not in c for c in chunks)
    assert streamed_text(chunks, chat) == (text, choice["finish_reason"])


def pick_stop(text: str) -> tuple[str, int] | None:
    """A short substring of `text` whose first occurrence starts after position 0."""
    for start in range(1, len(text)):
        for length in (3, 2, 1):
            s = text[start : start + length]
            if len(s) == length and s.strip() and text.find(s) == start:
                return s, start
    return None


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_stop_string_cuts_greedy_output(api, client, chat):
    if chat:
        path, base = "/v1/chat/completions", {"messages": [{"role": "user", "content": "Count to ten."}]}
    else:
        path, base = "/v1/completions", {"prompt": "The capital of France is"}
    base = {**base, "model": api.model, "temperature": 0, "max_tokens": 32, "ignore_eos": True}

    def text_of(body: dict) -> str:
        choice = body["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]

    full = client.post(path, json=base).json()
    found = pick_stop(text_of(full))
    assert found is not None, f"greedy output too short to test stop strings: {text_of(full)!r}"
    stop, at = found
    r = client.post(path, json={**base, "stop": [stop, "\x00never\x00"]})
    body = r.json()
    assert text_of(body) == text_of(full)[:at]
    assert body["choices"][0]["finish_reason"] == "stop"
    assert 1 <= body["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]

    chunks, _ = stream_completion(client, path, {**base, "stop": stop})
    assert streamed_text(chunks, chat) == (text_of(full)[:at], "stop")

    # The stop string kept in the output (vLLM's include_stop_str_in_output).
    r = client.post(path, json={**base, "stop": stop, "include_stop_str_in_output": True})
    assert text_of(r.json()) == text_of(full)[: at + len(stop)]
    assert wait_kv_free(api) == [0] * len(kv_blocks_used(api.state()))


def test_n_and_batched_prompts(api, client):
    prompts = ["Hello there", "Goodbye now"]
    singles = [
        client.post("/v1/completions", json={"model": api.model, "prompt": p, "max_tokens": 6, "temperature": 0}).json()
        for p in prompts
    ]
    batch = {"model": api.model, "prompt": prompts, "n": 2, "max_tokens": 6, "temperature": 0}
    r = client.post("/v1/completions", json=batch)
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for i, single in enumerate(singles):
        for j in range(2):
            assert body["choices"][i * 2 + j]["text"] == single["choices"][0]["text"]
    assert body["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in singles)
    assert body["usage"]["completion_tokens"] == 2 * sum(s["usage"]["completion_tokens"] for s in singles)

    chunks, _ = stream_completion(
        client, "/v1/chat/completions",
        {"model": api.model, "messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 5},
    )  # fmt: skip
    finished = {ch["index"]: ch["finish_reason"] for c in chunks for ch in c["choices"] if ch["finish_reason"]}
    assert sorted(finished) == [0, 1, 2]


def test_sampling_with_seed_is_reproducible(api, client):
    body = {"model": api.model, "prompt": "Random words:", "max_tokens": 12, "temperature": 1.0, "seed": 1234}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert a == b


def test_chat_content_parts_and_template_kwargs(api, client):
    as_string = {"role": "user", "content": "Hello world"}
    as_parts = {"role": "user", "content": [{"type": "text", "text": "Hello world"}]}
    outs = [
        client.post(
            "/v1/chat/completions",
            json={"model": api.model, "messages": [m], "max_tokens": 5, "temperature": 0},
        ).json()
        for m in (as_string, as_parts)
    ]
    assert outs[0]["choices"][0]["message"] == outs[1]["choices"][0]["message"]
    assert outs[0]["usage"] == outs[1]["usage"]
    expected = api.tokenizer.apply_chat_template([as_string], add_generation_prompt=True)
    assert outs[0]["usage"]["prompt_tokens"] == len(api.tokenizer.encode(expected, add_special_tokens=False))


# ---- the openai client ---------------------------------------------------------------------------------------


def test_openai_client(api, client):
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0)

    ref = client.post("/v1/completions", json={"model": api.model, "prompt": "Hi", "max_tokens": 8, "temperature": 0})
    c = oc.completions.create(model=api.model, prompt="Hi", max_tokens=8, temperature=0)
    assert c.choices[0].text == ref.json()["choices"][0]["text"]
    assert c.usage.completion_tokens == ref.json()["usage"]["completion_tokens"]
    streamed = "".join(
        ch.choices[0].text
        for ch in oc.completions.create(model=api.model, prompt="Hi", max_tokens=8, temperature=0, stream=True)
        if ch.choices
    )
    assert streamed == c.choices[0].text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = oc.chat.completions.create(model=api.model, messages=messages, max_tokens=8, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    parts, usage = [], None
    for ch in oc.chat.completions.create(
        model=api.model, messages=messages, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ):  # fmt: skip
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
        if ch.usage is not None:
            usage = ch.usage
    assert "".join(parts) == chat.choices[0].message.content
    assert usage is not None and usage.total_tokens == chat.usage.total_tokens

    assert [m.id for m in oc.models.list()] == [api.model]
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="nope", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError) as e:
        oc.chat.completions.create(model=api.model, messages=messages, temperature=-1)
    assert "temperature" in str(e.value)


def test_async_openai_client_concurrent(api):
    openai = pytest.importorskip("openai")

    async def main() -> list[str]:
        oc = openai.AsyncOpenAI(base_url=api.url + "/v1", api_key="unused", max_retries=0)
        try:
            outs = await asyncio.gather(
                *(
                    oc.completions.create(model=api.model, prompt=f"Item {i}:", max_tokens=6, temperature=0)
                    for i in range(8)
                )
            )
        finally:
            await oc.close()
        return [o.choices[0].text for o in outs]

    concurrent = asyncio.run(main())
    with httpx.Client(base_url=api.url, timeout=TIMEOUT) as c:
        bodies = [{"model": api.model, "prompt": f"Item {i}:", "max_tokens": 6, "temperature": 0} for i in range(8)]
        sequential = [c.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in bodies]
    assert concurrent == sequential


# ---- disconnects ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_client_disconnect_mid_stream_frees_kv_blocks(api, client, path):
    max_model_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    if path == "/v1/completions":
        body = {"prompt": "A long story begins here:"}
    else:
        body = {"messages": [{"role": "user", "content": "Write a very long story."}]}
    max_tokens = min(max_model_len - 64, 1000)
    body = {**body, "model": api.model, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    assert wait_kv_free(api) == [0] * len(kv_blocks_used(api.state()))
    aborted = aborted_requests(api)
    with httpx.Client(base_url=api.url, timeout=TIMEOUT) as own:
        with own.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            got = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    got += 1
                    if got == 4:
                        break
            assert sum(kv_blocks_used(api.state())) > 0  # the request holds blocks while it runs
    # The client is gone: the request is aborted (long before its max_tokens) and its blocks come back.
    wait_until(lambda: aborted_requests(api) > aborted, 30, "the server aborting the request whose client left")
    assert wait_kv_free(api) == [0] * len(kv_blocks_used(api.state()))
    assert aborted_requests(api) == aborted + 1


def test_client_disconnect_non_streaming_frees_kv_blocks(api, client):
    max_model_len = client.get("/v1/models").json()["data"][0]["max_model_len"]
    body = {"model": api.model, "prompt": "Go on:", "max_tokens": min(max_model_len - 32, 1000), "ignore_eos": True}
    aborted = aborted_requests(api)
    with pytest.raises(httpx.TimeoutException):  # the client waits 0.5 s for an answer, then leaves
        httpx.post(api.url + "/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.5))
    wait_until(lambda: aborted_requests(api) > aborted, 30, "the server aborting the request whose client left")
    assert wait_kv_free(api) == [0] * len(kv_blocks_used(api.state()))
    assert aborted_requests(api) == aborted + 1


# ---- auth ----------------------------------------------------------------------------------------------------


def test_api_key_and_admin_token(api):
    """A second app over the same engine, with keys, served in the head's event loop."""
    engine = getattr(getattr(api, "head", None), "coordinator", None)
    if engine is None or not hasattr(api, "loop"):
        pytest.skip("the api fixture does not expose its head and event loop")
    from eep_hpc.config import ServeConfig
    from eep_hpc.serve.app import create_app
    from eep_hpc.serve.server import ApiServer

    cfg = ServeConfig(port=0, api_key="sk-test", admin_token="adm-test")
    server = ApiServer(create_app(engine, cfg), cfg, log_level="warning")
    url = asyncio.run_coroutine_threadsafe(server.start(), api.loop).result(60)
    try:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            body = {"model": api.model, "prompt": "Hi", "max_tokens": 2}
            err = assert_error(c.post("/v1/completions", json=body), 401)
            assert err["code"] == "invalid_api_key"
            assert_error(c.post("/v1/completions", json=body, headers={"Authorization": "Bearer wrong"}), 401)
            assert_error(c.get("/v1/models", headers={"Authorization": "Bearer adm-test"}), 401)
            ok = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer sk-test"})
            assert ok.status_code == 200, ok.text
            assert c.get("/health").status_code == 200  # not behind the key
            assert_error(c.get("/admin/state"), 401)
            assert_error(c.get("/admin/state", headers={"Authorization": "Bearer sk-test"}), 401)
            assert c.get("/admin/state", headers={"Authorization": "Bearer adm-test"}).status_code == 200

            openai = pytest.importorskip("openai")
            oc = openai.OpenAI(base_url=url + "/v1", api_key="sk-test", max_retries=0)
            assert oc.completions.create(model=api.model, prompt="Hi", max_tokens=2).choices
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=url + "/v1", api_key="bad", max_retries=0).models.list()
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(), api.loop).result(60)
