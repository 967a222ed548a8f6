"""The system on CUDA GPUs (skipped without them), each test against an independent reference:

- fp32 on a GPU gives the CPU's greedy token ids exactly: the same tiny checkpoint and token-id prompts, the CPU
  reference run by an in-process engine (no head, no GPU). TF32 is off for torch's matmuls and the Triton kernels
  use IEEE fp32 dots, and the tiny model's top logits are far enough apart that rounding in another order picks
  the same tokens. Served through HTTP by one rank, by two ranks on two GPUs across grow and shrink, and with
  decode CUDA graphs on and off.
- bf16 on a GPU gives logprobs within twice transformers' own bf16 error, both measured against transformers in
  fp32 (as tests/test_deepseek_v2.py does for logits).

Token ids come back through the OpenAI API itself: the served model directory holds the tiny checkpoint's weights
with a tokenizer whose token i is the text "<ti>" (`id_token_model`), so the `logprobs` tokens of a completion name
their ids (`complete`). The CPU test below checks that read-back against the in-process engine.

The helpers above the tests (`id_token_model`, `complete`, `scale`, `engine_for`, `PROMPT_IDS`) are shared with
test_fp8.py and test_nixl_ep.py, which import them inside their GPU tests; they belong in tests/support.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch

from conftest import greedy, start_head

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
GPU = "cuda"  # the device the GPU tests serve on

# ---- shared helpers: token-id prompts in, token ids and logprobs out, through the OpenAI API -----------------------

# 16 token-id prompts of the tiny vocabulary (ids 3..511, past its special tokens): one token, short ones, and
# lengths on both sides of a 16-token KV block.
PROMPT_LENGTHS = [1, 2, 3, 5, 8, 13, 15, 16, 17, 24, 31, 32, 33, 40, 49, 64]
PROMPT_IDS = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(100 + n)).tolist()
              for n in PROMPT_LENGTHS]


def write_id_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """tokenizer.json and tokenizer_config.json of a word-level vocabulary whose token i is the text "<ti>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def id_token_model(src: Path, dst: Path) -> Path:
    """A model directory with src's config and weights (linked) and the id tokenizer (`write_id_tokenizer`)."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.startswith("tokenizer"):
            (dst / f.name).symlink_to(f.resolve())
    write_id_tokenizer(dst, json.loads((dst / "config.json").read_text())["vocab_size"])
    return dst


def token_id(piece: str) -> int:
    m = re.fullmatch(r"<t(\d+)>", piece)
    assert m, f"{piece!r} is not a token of the id tokenizer"
    return int(m.group(1))


@dataclass
class Completion:
    ids: list[int]  # the generated token ids
    logprobs: list[float]  # theirs
    top: list[dict[int, float]]  # per generated token: the most likely tokens' logprobs (the chosen one included)
    prompt_top: list[dict[int, float]]  # with echo: the same for prompt tokens 1.. (token 0 has none)


async def _complete_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                        top: int, echo: bool) -> Completion:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": top, "echo": echo}
    r = await client.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text[:500]
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "length", choice
    lp = choice["logprobs"]
    ids = [token_id(t) for t in lp["tokens"]]
    tops = [None if d is None else {token_id(k): v for k, v in d.items()} for d in lp["top_logprobs"]]
    n = len(prompt) if echo else 0
    assert len(ids) == n + max_tokens and ids[:n] == prompt[:n], (prompt, ids)
    return Completion(ids[n:], lp["token_logprobs"][n:], tops[n:], tops[1:n])


def complete(url: str, model: str, prompts: list[list[int]], max_tokens: int, top: int = 0,
             echo: bool = False) -> list[Completion]:
    """Greedy completions of token-id prompts, sent at once (one request each), from a model served with the id
    tokenizer; `top` most likely tokens' logprobs per token, and the prompt's too with echo."""
    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[_complete_one(client, url, model, p, max_tokens, top, echo)
                                          for p in prompts])

    return list(asyncio.run(main()))


def greedy_ids(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return [c.ids for c in complete(url, model, prompts, max_tokens)]


def scale(head, action: str, body: dict) -> dict:
    """POST /admin/scale/{grow,shrink}; the event's figures."""
    r = httpx.post(f"{head.url}/admin/scale/{action}", json=body, timeout=600)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def engine_for(model_dir: Path, device: str = "cpu", **model):
    """A one-rank engine in process holding every expert (no head)."""
    from eep_hpc import protocol as P
    from eep_hpc.config import Config, EngineConfig, ModelConfig
    from eep_hpc.engine.rank_engine import build_engine
    from eep_hpc.model.arch import load_arch
    from eep_hpc.parallel.groups import EpochGroup

    arch = load_arch(model_dir)
    cfg = Config(model=ModelConfig(path=str(model_dir), **model), engine=EngineConfig(num_kv_blocks=256))
    launch = P.RankLaunch(rank_id=0, head_address="", model_dir=str(model_dir), eos_token_ids=[], device=device,
                          config=cfg)
    epoch = P.Epoch(epoch=0, rank_ids=[0], store_host="", store_port=0,
                    physical_to_logical=[list(range(arch.num_experts))] * len(arch.moe_layers),
                    slot_offsets=[0, arch.num_experts])
    return build_engine(launch, epoch, EpochGroup(None, 0, 0, 1, torch.device(device)))


# ---- fixtures ------------------------------------------------------------------------------------------------------

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


def rms(xs: list[float]) -> float:
    return (sum(x * x for x in xs) / len(xs)) ** 0.5


def assert_within_bf16_error(ours: list[list[float]], theirs: list[list[float]], floor: float = 0.01) -> None:
    """Typical (the median position) and worst (the prompt of largest RMS) error of ours within twice transformers'
    bf16 error (+ floor, in nats). bf16 rounding and the routing choices it flips (the tiny model's router logits
    are spread, some tokens sit near a tie between experts) make the worst positions far worse than the median."""
    med_ours, med_theirs = (statistics.median(x for e in es for x in e) for es in (ours, theirs))
    worst_ours, worst_theirs = max(map(rms, ours)), max(map(rms, theirs))
    print(f"logprob error, nats: median {med_ours:.4f} (transformers bf16 {med_theirs:.4f}), worst prompt's RMS "
          f"{worst_ours:.4f} (transformers bf16 {worst_theirs:.4f})")
    assert med_ours <= 2 * med_theirs + floor, (med_ours, med_theirs)
    assert worst_ours <= 2 * worst_theirs + floor, (worst_ours, worst_theirs)


def check_bf16_against_transformers(model_dir: Path, tmp_path: Path, device: str) -> None:
    """bf16 served on `device` vs transformers: fp32 (the reference, on the CPU) and bf16 (on `device`)."""
    from eep_hpc.model.tiny import ensure_tiny_checkpoint
    from hf_reference import hf_model

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
def test_decode_cuda_graphs_keep_token_ids_and_run(tiny_ids, cpu_greedy, tmp_path):
    """Decode steps replay CUDA graphs (padded batch sizes, static buffers) and give the CPU's token ids, in fp32."""
    got, graph_steps = {}, {}
    for graphs in (False, True):
        head = start_head(tmp_path / str(graphs), ranks=1, parallel={"device": GPU},
                          model={"path": str(tiny_ids), "dtype": "float32"},
                          engine={"cuda_graphs": graphs, "cuda_graph_max_batch": 24})
        try:
            got[graphs] = greedy_ids(head.url, head.model, PROMPT_IDS, NEW)
            graph_steps[graphs] = head.state()["ranks"][0]["graph_steps"]
        finally:
            head.stop()
    assert graph_steps[False] == 0 and graph_steps[True] > 0, graph_steps
    assert got[False] == cpu_greedy
    assert got[True] == cpu_greedy


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
