"""The system on CUDA GPUs (skipped without them), each test against an independent reference:

- fp32 on a GPU gives the CPU's greedy token ids exactly: the same tiny checkpoint and token-id prompts, the CPU
  reference run by an in-process engine (no head, no GPU). TF32 is off for torch's matmuls and the Triton kernels
  use IEEE fp32 dots, and the tiny model's top logits are far enough apart that rounding in another order picks
  the same tokens. Served through HTTP by one rank, by two ranks on two GPUs across grow and shrink, and with
  CUDA graphs on and off (decode and mixed).
- bf16 on a GPU gives logprobs within twice transformers' own bf16 error, both measured against transformers in
  fp32 (as tests/model/test_deepseek_v2.py does for logits).

Token ids come back through the OpenAI API itself: the served model directory holds the tiny checkpoint's weights
with a tokenizer whose token i is the text "<ti>" (`id_token_model`), so the `logprobs` tokens of a completion name
their ids (`complete`). The CPU test below checks that read-back against the in-process engine.

The helpers (`id_token_model`, `complete`, `scale`, `engine_for`, `PROMPT_IDS`, `assert_within_bf16_error`) live in
tests/support.py: test_fp8.py and test_nixl_ep.py use them too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support import (PROMPT_IDS, Completion, assert_within_bf16_error, complete, engine_for, greedy, greedy_ids,
                     id_token_model, scale, start_head)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
GPU = "cuda"  # the device the GPU tests serve on

# ---- shared helpers: token-id prompts in, token ids and logprobs out, through the OpenAI API -----------------------

NEW = 24  # greedy tokens per prompt


@pytest.fixture(scope="module")
def tiny_ids(tmp_path_factory) -> Path:
    from eep_hpc.model.tiny import ensure_tiny_checkpoint

    return id_token_model(ensure_tiny_checkpoint(), tmp_path_factory.mktemp("tiny") / "ids")


@pytest.fixture(scope="module")
def cpu_greedy(tiny_ids) -> list[list[int]]:
    """The reference: greedy token ids of the in-process CPU engine (fp32)."""
    ids = greedy(engine_for(tiny_ids), PROMPT_IDS, NEW)
    assert len({tuple(t) for t in ids}) > len(ids) // 2, "greedy outputs should differ between prompts"
    return ids


# ---- CPU: the read-back the GPU tests rely on ------------------------------------------------------------------------


def test_token_ids_read_back_through_the_api_are_the_engines(tiny_ids, cpu_greedy, tmp_path):
    head = start_head(tmp_path, ranks=1, model={"path": str(tiny_ids)})
    try:
        got = complete(head.url, head.model, PROMPT_IDS, NEW, top=2, echo=True)
    finally:
        head.stop()
    assert [c.ids for c in got] == cpu_greedy
    for c, p in zip(got, PROMPT_IDS):
        assert len(c.prompt_top) == len(p) - 1 and len(c.top) == NEW
        # greedy: each chosen token is the most likely one listed, with the logprob listed for it
        assert all(max(d, key=d.get) == t and d[t] == lp for d, t, lp in zip(c.top, c.ids, c.logprobs))


# ---- one GPU ---------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_gpu
def test_fp32_on_gpu_gives_the_cpus_greedy_token_ids(tiny_ids, cpu_greedy, tmp_path):
    head = start_head(tmp_path, ranks=1, parallel={"device": GPU}, model={"path": str(tiny_ids), "dtype": "float32"})
    try:
        assert head.state()["ranks"][0]["device"].startswith(GPU)
        got = greedy_ids(head.url, head.model, PROMPT_IDS, NEW)
    finally:
        head.stop()
    assert got == cpu_greedy


def logprob_errors(served: list[Completion], prompts: list[list[int]], ref, other) -> tuple[list, list]:
    """Per prompt, per predicted position (prompt tokens 1.., then the generated ones): the RMS over the tokens the
    served logprobs list there of |served - ref| and of |other - ref|, where ref and other are transformers models
    run on the same token sequence (prompt + served ids)."""
    ours, theirs = [], []
    for c, p in zip(served, prompts):
        seq = torch.tensor([p + c.ids])
        with torch.no_grad():
            want = torch.log_softmax(ref(seq.to(ref.device)).logits[0, :-1].float().cpu(), -1)
            alt = torch.log_softmax(other(seq.to(other.device)).logits[0, :-1].float().cpu(), -1)
        rows = c.prompt_top + c.top
        assert len(rows) == want.shape[0] and all(len(d) >= 20 for d in rows)
        e_ours, e_theirs = [], []
        for r, d in enumerate(rows):
            ids = torch.tensor(list(d))
            got = torch.tensor([d[i] for i in d.keys()])
            e_ours.append((got - want[r, ids]).pow(2).mean().sqrt().item())
            e_theirs.append((alt[r, ids] - want[r, ids]).pow(2).mean().sqrt().item())
        ours.append(e_ours)
        theirs.append(e_theirs)
    return ours, theirs


def check_bf16_against_transformers(model_dir: Path, tmp_path: Path, device: str) -> None:
    """bf16 served on `device` vs transformers: fp32 (the reference, on the CPU) and bf16 (on `device`)."""
    from eep_hpc.model.tiny import ensure_tiny_checkpoint
    from support import hf_model

    head = start_head(tmp_path, ranks=1, parallel={"device": device}, model={"path": str(model_dir),
                                                                            "dtype": "bfloat16"})
    try:
        served = complete(head.url, head.model, PROMPT_IDS, 16, top=20, echo=True)
    finally:
        head.stop()
    ref = hf_model(ensure_tiny_checkpoint())
    hf_bf16 = hf_model(ensure_tiny_checkpoint(), torch.bfloat16, device)
    assert_within_bf16_error(*logprob_errors(served, PROMPT_IDS, ref, hf_bf16))


@pytest.mark.gpu
@needs_gpu
def test_bf16_on_gpu_logprobs_within_transformers_bf16_error(tiny_ids, tmp_path):
    """Prefill (the prompt's logprobs, echo) and decode (the generated tokens'): the 20 most likely tokens' logprobs
    at every position against transformers fp32 on the same sequence."""
    check_bf16_against_transformers(tiny_ids, tmp_path, GPU)


@pytest.mark.gpu
@needs_gpu
def test_cuda_graphs_keep_token_ids_and_run(tiny_ids, cpu_greedy, tmp_path):
    """Steps replay CUDA graphs (decode graphs by padded batch size; mixed graphs by padded token count, for the
    prefills; static buffers) and give the CPU's token ids, in fp32."""
    got, graph_steps = {}, {}
    for name, graphs, mixed in (("eager", False, 0), ("decode", True, 0), ("mixed", True, 512)):
        head = start_head(tmp_path / name, ranks=1, parallel={"device": GPU},
                          model={"path": str(tiny_ids), "dtype": "float32"},
                          engine={"cuda_graphs": graphs, "cuda_graph_max_batch": 24, "cuda_graph_max_tokens": mixed})
        try:
            got[name] = greedy_ids(head.url, head.model, PROMPT_IDS, NEW)
            graph_steps[name] = head.state()["ranks"][0]["graph_steps"]
        finally:
            head.stop()
    # the prefills replay mixed graphs too
    assert graph_steps["eager"] == 0 < graph_steps["decode"] < graph_steps["mixed"], graph_steps
    assert got == {"eager": cpu_greedy, "decode": cpu_greedy, "mixed": cpu_greedy}


# ---- two GPUs --------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@needs_two_gpus
def test_grow_and_shrink_across_two_gpus_keep_token_ids(tiny_ids, cpu_greedy, tmp_path):
    """NCCL groups per epoch, expert transfer between GPUs, dense weights read from a peer's VRAM over NIXL: the
    CPU's greedy token ids on one GPU, on two, and on the joiner alone."""
    head = start_head(tmp_path, ranks=1, parallel={"device": GPU}, model={"path": str(tiny_ids), "dtype": "float32"})
    got = {}
    try:
        got["one"] = greedy_ids(head.url, head.model, PROMPT_IDS, NEW)
        grown = scale(head, "grow", {"n": 1})
        state = head.state()
        got["two"] = greedy_ids(head.url, head.model, PROMPT_IDS, NEW)
        shrunk = scale(head, "shrink", {"rank_ids": [state["members"][0]]})
        assert len(head.state()["members"]) == 1
        got["after"] = greedy_ids(head.url, head.model, PROMPT_IDS, NEW)
    finally:
        head.stop()
    print("grow:", grown, "\nshrink:", shrunk)
    assert grown["phase"] == shrunk["phase"] == "DONE"
    assert grown["dense_source"].startswith("nixl:"), grown
    assert len(state["members"]) == 2
    assert {r["device"] for r in state["ranks"]} == {"cuda:0"}  # each rank sees only its own GPU
    for phase, ids in got.items():
        assert ids == cpu_greedy, phase
