"""Sampling penalties through the API, against transformers' logits run through a plain-Python reference of vLLM's
penalties, on one rank and on two expert-parallel ranks (the tiny model, served with the id tokenizer so that the
returned tokens are the token ids)."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch

from eep_hpc.protocol import SamplingParams
from support import PROMPT_IDS, id_token_model, reference_penalties, start_head, token_id

NEW_TOKENS = 24
# PROMPT_IDS[5] (13 tokens) makes the tiny model repeat itself greedily: 7 of its 24 tokens are repeats
PROMPTS = [PROMPT_IDS[5], PROMPT_IDS[4], PROMPT_IDS[0]]
PENALTIES = [
    {},
    {"frequency_penalty": 2.0},
    {"repetition_penalty": 2.0},
    {"presence_penalty": 1.0, "frequency_penalty": 0.5, "repetition_penalty": 1.2},
    {"presence_penalty": -0.5, "repetition_penalty": 0.8},  # rewards repeats
]


@pytest.fixture(scope="module")
def tiny_ref():
    import transformers

    from eep_hpc.model.tiny import ensure_tiny_checkpoint

    return transformers.Qwen3MoeForCausalLM.from_pretrained(ensure_tiny_checkpoint(), dtype=torch.float32).eval()


ON_GPU = {"parallel": {"device": "cuda"}, "model": {"dtype": "float32"},  # fp32, as tests/gpu/test_gpu.py
          "engine": {"cuda_graphs": True, "cuda_graph_max_batch": 24}}


@pytest.fixture(scope="module", params=[1, 2, pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])], ids=["1-rank", "2-ranks", "1-gpu-cuda-graphs"])
def head(request, tmp_path_factory):
    """One or two CPU ranks, or one GPU rank whose decode steps replay CUDA graphs: the penalties run on the
    logits the graph produced, eagerly after it, so a batch with penalised rows still replays one."""
    from eep_hpc.model.tiny import ensure_tiny_checkpoint

    model = id_token_model(ensure_tiny_checkpoint(), tmp_path_factory.mktemp("id-model") / "tiny")
    gpu = request.param == "gpu"
    overrides = {**ON_GPU, "model": {**ON_GPU["model"], "path": str(model)}} if gpu else {"model": {"path": str(model)}}
    running = start_head(tmp_path_factory.mktemp("run"), ranks=1 if gpu else request.param, **overrides)
    yield running
    running.stop()


def reference(model, prompt: list[int], penalties: dict) -> tuple[list[int], list[float]]:
    """Greedy tokens from transformers' logits after the reference penalties, and each one's raw logprob."""
    sampling = SamplingParams(**penalties)
    ids, raw = list(prompt), []
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            row = reference_penalties(logits.tolist(), prompt, ids[len(prompt):], sampling)
            token = max(range(len(row)), key=row.__getitem__)
            raw.append(torch.log_softmax(logits, dim=-1)[token].item())
            ids.append(token)
    return ids[len(prompt):], raw


async def served(url: str, model: str, cases: list[tuple[list[int], dict]]) -> list[tuple[list[int], list[float]]]:
    """All cases at once (so penalised and plain rows share batches): greedy ids and their logprobs."""
    async def one(client, prompt, penalties):
        body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                "logprobs": 0, **penalties}
        r = await client.post(f"{url}/v1/completions", json=body)
        assert r.status_code == 200, r.text[:500]
        lp = r.json()["choices"][0]["logprobs"]
        return [token_id(t) for t in lp["tokens"]], lp["token_logprobs"]

    async with httpx.AsyncClient(timeout=300) as client:
        return await asyncio.gather(*[one(client, p, pen) for p, pen in cases])


def test_penalties_give_the_reference_tokens(head, tiny_ref):
    cases = [(p, pen) for p in PROMPTS for pen in PENALTIES]
    graph_steps = head.state()["ranks"][0]["graph_steps"]
    got = asyncio.run(served(head.url, head.model, cases))
    if head.state()["ranks"][0]["device"].startswith("cuda"):  # every decode step had penalised rows
        assert head.state()["ranks"][0]["graph_steps"] - graph_steps >= NEW_TOKENS // 2
    for (prompt, penalties), (ids, logprobs) in zip(cases, got):
        want, raw = reference(tiny_ref, prompt, penalties)
        assert ids == want, (prompt, penalties)
        # logprobs are of the raw distribution, before the penalties (vLLM's default)
        assert logprobs == pytest.approx(raw, abs=2e-4), (prompt, penalties)
    plain = dict(zip([(tuple(p), tuple(pen.items())) for p, pen in cases], [ids for ids, _ in got]))
    repeats = plain[(tuple(PROMPTS[0]), ())]
    assert len(set(repeats)) < len(repeats)  # without penalties the model repeats itself ...
    for penalties in ({"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}):
        ids = plain[(tuple(PROMPTS[0]), tuple(penalties.items()))]
        assert len(set(ids)) == len(ids), penalties  # ... with a strong penalty it does not
