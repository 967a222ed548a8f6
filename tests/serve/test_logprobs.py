"""Logprobs: the raw model distribution (log_softmax of the logits) against transformers on the same weights, in
process and through the OpenAI API (completions with echo, chat with top_logprobs, streaming)."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from eep_hpc import protocol as P
from support import hf_model, save_random_hf_model
from support import single_rank_engine

TOL = 2e-4
TOP = 5


def reference_logprobs(model, token_ids: list[int]) -> torch.Tensor:
    """[T, V]: row p is the distribution of token p + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].float(), dim=-1)


def check_against(ref_lp: torch.Tensor, rows: range, targets: list[int], lp: P.Logprobs, k: int) -> None:
    assert len(lp) == len(targets) == len(rows)
    for j, (row, tok) in enumerate(zip(rows, targets)):
        want = ref_lp[row]
        assert abs(lp.token_logprobs[j] - want[tok].item()) < TOL, f"row {row}"
        top = want.topk(k)
        assert lp.top_ids[j] == top.indices.tolist(), f"row {row}"
        assert torch.allclose(torch.tensor(lp.top_logprobs[j]), top.values, atol=TOL)


# ---- in process, on random HF checkpoints ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def checkpoint(request, tmp_path_factory):
    path = save_random_hf_model(request.param, tmp_path_factory.mktemp(request.param))
    return path, hf_model(path)


def engine_for(path, ref, **engine):
    cfg = ref.config
    num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    num_moe = len([i for i in range(cfg.num_hidden_layers) if i not in (getattr(cfg, "mlp_only_layers", None) or [])])
    return single_rank_engine(path, num_experts, num_moe, **engine)


def generate(engine, prompts, sampling: P.SamplingParams) -> list[P.RequestOutput]:
    for i, p in enumerate(prompts):
        engine.add(P.AddRequest(request_id=str(i), prompt_token_ids=p, sampling=sampling))
    merged = {str(i): P.RequestOutput(request_id=str(i), new_token_ids=[], logprobs=P.Logprobs())
              for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            m = merged[o.request_id]
            m.new_token_ids += o.new_token_ids
            if o.logprobs is not None:
                m.logprobs.token_logprobs += o.logprobs.token_logprobs
                m.logprobs.top_ids += o.logprobs.top_ids
                m.logprobs.top_logprobs += o.logprobs.top_logprobs
            if o.prompt_logprobs is not None:
                assert m.prompt_logprobs is None, "prompt logprobs sent twice"
                m.prompt_logprobs = o.prompt_logprobs
            m.finish_reason = o.finish_reason
    return [merged[str(i)] for i in range(len(prompts))]


PROMPTS = [[1, 5, 9, 200, 3], [7], list(range(100, 117)), list(range(10, 47))]


@pytest.mark.parametrize(
    "engine_cfg, temperature",
    [
        ({"max_num_batched_tokens": 24, "num_kv_blocks": 64}, 0.0),  # chunked prefill next to decodes
        ({"max_num_batched_tokens": 2048, "num_kv_blocks": 64}, 1.0),  # sampled: logprobs stay raw
        ({"max_num_batched_tokens": 16, "num_kv_blocks": 5}, 0.0),  # preemption, also mid-prefill
    ],
)
def test_logprobs_match_transformers(checkpoint, engine_cfg, temperature):
    path, ref = checkpoint
    engine = engine_for(path, ref, **engine_cfg)
    sampling = P.SamplingParams(max_tokens=8, temperature=temperature, top_k=3, seed=1, ignore_eos=True,
                                logprobs=TOP, prompt_logprobs=TOP)
    outs = generate(engine, PROMPTS, sampling)
    for prompt, out in zip(PROMPTS, outs):
        full = prompt + out.new_token_ids
        ref_lp = reference_logprobs(ref, full)
        n = len(out.new_token_ids)
        assert n == 8
        check_against(ref_lp, range(len(prompt) - 1, len(full) - 1), out.new_token_ids, out.logprobs, TOP)
        if len(prompt) == 1:
            assert out.prompt_logprobs is None  # the only prompt token has no logprob
        else:
            check_against(ref_lp, range(len(prompt) - 1), prompt[1:], out.prompt_logprobs, TOP)
    assert engine.block_manager.num_used_blocks == 0
    if engine_cfg["num_kv_blocks"] == 5:
        assert engine.scheduler.num_preemptions > 0


def test_no_logprobs_unless_asked_and_prompt_logprobs_skip_the_cache(checkpoint):
    path, ref = checkpoint
    engine = engine_for(path, ref, num_kv_blocks=64)
    prompt = list(range(3, 40))
    (plain,) = generate(engine, [prompt], P.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True))
    assert plain.logprobs == P.Logprobs() and plain.prompt_logprobs is None
    hits = engine.stats().prefix_cache_hits
    (out,) = generate(engine, [prompt], P.SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True,
                                                          logprobs=0, prompt_logprobs=0))
    assert engine.stats().prefix_cache_hits == hits  # every prompt position computed again for its logits
    assert out.new_token_ids == plain.new_token_ids
    assert len(out.prompt_logprobs) == len(prompt) - 1 and out.prompt_logprobs.top_ids[0] == []
    assert len(out.logprobs) == 3 and out.logprobs.top_ids == [[], [], []]
    check_against(reference_logprobs(ref, prompt), range(len(prompt) - 1), prompt[1:],
                  P.Logprobs(token_logprobs=out.prompt_logprobs.token_logprobs, top_ids=[[]] * 36,
                             top_logprobs=[[]] * 36), 0)


# ---- through the API, on the tiny model -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ref():
    import transformers

    from eep_hpc.model.tiny import ensure_tiny_checkpoint

    return transformers.Qwen3MoeForCausalLM.from_pretrained(ensure_tiny_checkpoint(), dtype=torch.float32).eval()


@pytest.fixture
def client(api):
    with httpx.Client(base_url=api.url, timeout=120) as c:
        yield c


def sse(response) -> list[dict]:
    events = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_completion_logprobs_with_echo_match_transformers(api, client, tiny_ref):
    prompt = [42, 341, 358, 14, 297, 325, 259, 287, 313, 33]
    body = {"model": api.model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": 3, "echo": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    n = r.json()["usage"]["completion_tokens"]
    assert n == 6
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    assert len(lp["tokens"]) == len(prompt) + n
    prompt_text = api.tokenizer.decode(prompt, skip_special_tokens=False)
    assert choice["text"].startswith(prompt_text)
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["text_offset"][0] == 0 and lp["text_offset"] == sorted(lp["text_offset"])
    assert lp["text_offset"][len(prompt)] == len(prompt_text)
    # the same numbers as transformers' log_softmax over prompt + completion
    # (greedy: each completion token is the most likely one)
    ref_full = prompt[:]
    for _ in range(n):
        ref_full.append(int(reference_logprobs(tiny_ref, ref_full)[-1].argmax()))
    ref_lp = reference_logprobs(tiny_ref, ref_full)
    for pos in range(1, len(ref_full)):
        want = ref_lp[pos - 1]
        assert abs(lp["token_logprobs"][pos] - want[ref_full[pos]].item()) < TOL
        top = lp["top_logprobs"][pos]  # the 3 most likely and the chosen token (tokens of equal text collapse)
        assert 1 <= len(top) <= 4 and lp["tokens"][pos] in top
        allowed = want.topk(3).values.tolist() + [want[ref_full[pos]].item()]
        assert all(min(abs(v - a) for a in allowed) < TOL for v in top.values())
        if pos >= len(prompt):
            assert max(top.values()) == pytest.approx(lp["token_logprobs"][pos], abs=TOL)  # greedy
    # streamed: the same logprobs, split over chunks, the echo in the first
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as s:
        chunks = sse(s)
    text = "".join(c["choices"][0]["text"] for c in chunks)
    merged = {k: sum((c["choices"][0]["logprobs"][k] for c in chunks if c["choices"][0]["logprobs"]), [])
              for k in lp}
    assert text == choice["text"]
    assert merged == lp


def test_completion_logprobs_shapes(api, client):
    body = {"model": api.model, "prompt": ["Hello", "The sky is"], "max_tokens": 4, "temperature": 0, "n": 2,
            "logprobs": 0}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4
    for c in choices:
        lp = c["logprobs"]
        assert 1 <= len(lp["tokens"]) <= 4 and all(len(t) == 1 for t in lp["top_logprobs"])
        assert all(v <= 0 for v in lp["token_logprobs"])
        assert "".join(lp["tokens"]) == c["text"] or "\ufffd" in "".join(lp["tokens"])
        assert lp["text_offset"][0] == 0
    # echo alone: the prompt comes back, no logprobs
    r = client.post("/v1/completions", json={"model": api.model, "prompt": "Hello there", "max_tokens": 2,
                                             "echo": True, "temperature": 0})
    (c,) = r.json()["choices"]
    assert c["text"].startswith("Hello there") and c["logprobs"] is None
    # no logprobs asked: null, as before
    r = client.post("/v1/completions", json={"model": api.model, "prompt": "Hi", "max_tokens": 2})
    assert r.json()["choices"][0]["logprobs"] is None


def test_chat_logprobs_shapes_and_stream(api, client):
    messages = [{"role": "user", "content": "Tell me a story."}]
    body = {"model": api.model, "messages": messages, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 4}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    content = choice["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] == 6
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        tops = entry["top_logprobs"]
        assert len(tops) == 4 and [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["logprob"] == pytest.approx(entry["logprob"])  # greedy: the most likely token
        assert all(set(t) == {"token", "logprob", "bytes"} for t in tops)
    raw = b"".join(bytes(e["bytes"]) for e in content)
    assert raw.decode("utf-8", errors="replace") == choice["message"]["content"]
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
        chunks = sse(s)
    streamed = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    # the same tokens; values up to float noise (the repeat reuses the cached prompt KV, computed in other chunks)
    assert [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in streamed] == \
        [(e["token"], [t["token"] for t in e["top_logprobs"]]) for e in content]
    for a, b in zip(streamed, content):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=TOL)
        assert [t["logprob"] for t in a["top_logprobs"]] == pytest.approx([t["logprob"] for t in b["top_logprobs"]],
                                                                          abs=TOL)
    # logprobs without top_logprobs: none listed
    r = client.post("/v1/chat/completions", json={**body, "top_logprobs": None})
    assert all(e["top_logprobs"] == [] for e in r.json()["choices"][0]["logprobs"]["content"])
    r = client.post("/v1/chat/completions", json={k: v for k, v in body.items() if "logprobs" not in k})
    assert r.json()["choices"][0]["logprobs"] is None


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/completions", {"prompt": "hi", "logprobs": 21}, "logprobs"),
        ("/v1/completions", {"prompt": "hi", "logprobs": -1}, "logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 1}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True,
                                  "top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_bad_logprobs_are_400(client, path, extra, param):
    r = client.post(path, json=extra)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param
