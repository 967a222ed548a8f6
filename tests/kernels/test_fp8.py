"""FP8 (e4m3, block scales) weights: quantisation, FP8 checkpoints in Hugging Face's layout, the fp8 expert kernel,
and fp8 experts moving between ranks with their scales.

Every reference here is built from the format's definition by code in this file (`ref_quantize`,
`ref_dequantize`: block by block, w = q * scale_inv of its block), never by the code under test. Block scales are
checked on weights whose every block has its own known largest magnitude, so the expected scale of each block is
known by construction. CPU: an FP8 checkpoint is dequantised at load, so its greedy tokens equal those of a
checkpoint holding the dequantised weights; the same holds with fp8 expert slots kept in the model (served by the
reference kernel, which dequantises slot by slot), which is the layout the GPU serves. Kernel checks run on a CUDA
GPU, or on the CPU through Triton's interpreter with TRITON_INTERPRET=1 (small shapes, fp32 and bf16 activations: kernels/kernel_checks.py mends the interpreter's bf16);
like tests/kernels/test_kernels.py they draw fresh inputs, poison the output with NaN and compare with the reference in
float64 on the dequantised weights. On a GPU: fp32 activations give the dequantised checkpoint's greedy tokens
exactly, bf16 activations logprobs within twice transformers' own bf16 error on the dequantised checkpoint.
"""

from __future__ import annotations

import json
import math
import re
import threading
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from support import greedy

from kernel_checks import DEVICE, DTYPES, TOL, big, needs_cuda, needs_kernels, rel_err

from eep_hpc import protocol as P
from eep_hpc.config import Config, EngineConfig, ModelConfig
from eep_hpc.engine.rank_engine import RankEngine, build_engine
from eep_hpc.kernels import ops
from eep_hpc.kernels.fp8 import (
    FP8,
    BlockScales,
    dequantize_blockwise,
    dequantize_w13,
    quantize_blockwise,
    quantize_w13,
    scale_shape,
)
from eep_hpc.kernels.moe import swiglu_experts_reference
from eep_hpc.model import fp8 as model_fp8
from eep_hpc.model.arch import Fp8Quantization, load_arch, parse_arch
from eep_hpc.model.loader import build_model
from eep_hpc.model.weights import DummySource
from eep_hpc.parallel.expert_transfer import SlotTensors, exchange_over_group, stage_experts
from eep_hpc.parallel.groups import EpochGroup, connect_store

PROMPTS = [[1, 5, 9, 200, 3], list(range(10, 47)), [7], [100, 101, 102, 103, 104, 105, 106, 107, 108]]


# ---- FP8 from its definition (the references: no code under test) ----

E4M3_MAX = 448.0  # the largest finite float8_e4m3fn
# The weights an FP8 checkpoint keeps in fp8 (Qwen3-*-FP8, DeepSeek-V3): attention and MLP/expert projections; not
# embeddings, norms, routers or lm_head.
QUANTISED = re.compile(r"\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj"
                       r"|block_sparse_moe\.experts\.\d+\.w[123])\.weight$")


def blocks(shape, block):
    """(i, j, rows, cols) of every block of a [..., N, K] weight, row blocks first; edge blocks are partial."""
    (N, K), (bn, bk) = shape[-2:], block
    for i in range(math.ceil(N / bn)):
        for j in range(math.ceil(K / bk)):
            yield i, j, slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)


def ref_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block, dtype=torch.float32) -> torch.Tensor:
    """w = q * scale_inv[block of the element], block by block (in float64 for float64, else in float32)."""
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.empty(q.shape, dtype=wide, device=q.device)
    for i, j, rows, cols in blocks(q.shape, block):
        w[..., rows, cols] = q[..., rows, cols].to(wide) * scale_inv[..., i, j, None, None].to(wide)
    return w.to(dtype)


def ref_quantize(w: torch.Tensor, block) -> tuple[torch.Tensor, torch.Tensor]:
    """Each block scaled so that its largest magnitude is 448: scale_inv = amax / 448 (an all-zero block gets the
    smallest normal float32), q = e4m3(w / scale_inv) rounded to nearest."""
    nb, kb = (math.ceil(n / b) for n, b in zip(w.shape[-2:], block))
    q = torch.empty(w.shape, dtype=torch.float32, device=w.device)
    s = torch.empty(*w.shape[:-2], nb, kb, dtype=torch.float32, device=w.device)
    for i, j, rows, cols in blocks(w.shape, block):
        b = w[..., rows, cols].float()
        si = (b.abs().amax(dim=(-2, -1), keepdim=True) / E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        q[..., rows, cols] = (b / si).clamp(-E4M3_MAX, E4M3_MAX)
        s[..., i, j] = si[..., 0, 0]
    return q.to(FP8), s


def ref_quantize_w13(w13: torch.Tensor, block):
    """[..., 2I, D]: gate and up quantised apart (separate checkpoint tensors); their scales stacked gate first."""
    I = w13.shape[-2] // 2
    (qg, sg), (qu, su) = ref_quantize(w13[..., :I, :], block), ref_quantize(w13[..., I:, :], block)
    return torch.cat([qg, qu], dim=-2), torch.cat([sg, su], dim=-2)


def ref_dequantize_w13(q, s, block, dtype=torch.float32):
    I, g = q.shape[-2] // 2, s.shape[-2] // 2
    return torch.cat([ref_dequantize(q[..., :I, :], s[..., :g, :], block, dtype),
                      ref_dequantize(q[..., I:, :], s[..., g:, :], block, dtype)], dim=-2)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def known_max_weight(shape, block, seed):
    """A weight [..., N, K] whose every block holds one element of magnitude m (its sign alternating, its place
    varying) and the rest below 0.9 m, with m different in every block (powers of 2^(1/4) over five octaves,
    shuffled): (weight, m per block [..., ceil(N/bn), ceil(K/bk)])."""
    g = torch.Generator().manual_seed(seed)
    grid = (*shape[:-2], *(math.ceil(n / b) for n, b in zip(shape[-2:], block)))
    amax = (2.0 ** (torch.randperm(math.prod(grid), generator=g).float() / 4 - 6)).reshape(grid)
    assert amax.unique().numel() == amax.numel()
    w = torch.empty(shape)
    for i, j, rows, cols in blocks(shape, block):
        part = w[..., rows, cols]
        m = amax[..., i, j, None, None]
        part.copy_((torch.rand(part.shape, generator=g) * 1.8 - 0.9) * m)
        r, c = (3 * i + j) % part.shape[-2], (i + 5 * j) % part.shape[-1]
        part[..., r, c] = m[..., 0, 0] * (-1) ** (i + j)
    return w, amax


# ---- quantisation ----

SHAPES = [((40, 100), (16, 32)), ((48, 48), (16, 16)), ((2, 33, 70), (16, 32)), ((300, 260), (128, 128)),
          ((5, 64), (1, 64)), ((3, 64, 96), (32, 32))]


@pytest.mark.parametrize("shape,block", SHAPES, ids=str)
def test_block_scales_are_each_blocks_own_maximum(shape, block):
    """Scales in the blocks' order (row block, then column block, per leading index): a scale per matrix, per row
    or column of blocks, or with the block grid transposed, gives other values."""
    w, amax = known_max_weight(shape, block, seed=len(shape) + shape[-1])
    q, s = quantize_blockwise(w, block)
    assert q.dtype == FP8 and q.shape == w.shape and s.dtype == torch.float32
    assert s.shape == amax.shape and torch.equal(s, amax / E4M3_MAX)
    for i, j, rows, cols in blocks(shape, block):  # each block's largest magnitude maps to +-448 exactly
        qb, wb = q[..., rows, cols].float(), w[..., rows, cols]
        assert torch.equal(qb.abs().amax(dim=(-2, -1)), torch.full(amax.shape[:-2], E4M3_MAX))
        assert torch.equal(qb.abs() == E4M3_MAX, wb.abs() == amax[..., i, j, None, None])
        assert torch.equal(qb.sign(), wb.sign())
    assert same_bits(q, ref_quantize(w, block)[0])


@pytest.mark.parametrize("shape,block", SHAPES, ids=str)
def test_dequantise_multiplies_each_block_by_its_own_scale(shape, block):
    g = torch.Generator().manual_seed(shape[-1])
    q = (torch.rand(shape, generator=g) * 2 * E4M3_MAX - E4M3_MAX).to(FP8)
    _, s = known_max_weight(shape, block, seed=1)  # distinct scales, one per block
    want = ref_dequantize(q, s, block)
    assert torch.equal(dequantize_blockwise(q, s, block), want)
    assert torch.equal(dequantize_blockwise(q, s, block, torch.bfloat16), want.to(torch.bfloat16))
    # by hand: the first and the last element (of the first and the last block)
    got = dequantize_blockwise(q, s, block)
    for corner in ((0,) * len(shape), (-1,) * len(shape)):
        assert got[corner] == q[corner].float() * s[corner]


@pytest.mark.parametrize("shape,block", [((256, 384), (128, 128)), ((100, 70), (128, 128)), ((96, 200), (16, 32)),
                                         ((3, 40, 24), (16, 16)), ((50, 64), (1, 64))], ids=str)
def test_blockwise_round_trip(shape, block):
    torch.manual_seed(0)
    w = torch.randn(shape) * torch.rand(shape[:-2] + (1, shape[-1])) * 3  # blocks of different ranges
    q, s = quantize_blockwise(w, block)
    assert q.dtype == FP8 and q.shape == w.shape and s.dtype == torch.float32
    assert s.shape == shape[:-2] + scale_shape(shape[-2:], block)
    for _, _, rows, cols in blocks(shape, block):  # each block's largest magnitude maps to 448
        assert torch.equal(q[..., rows, cols].float().abs().amax(dim=(-2, -1)), torch.full(shape[:-2], E4M3_MAX))
    back = dequantize_blockwise(q, s, block)
    assert torch.equal(back, ref_dequantize(q, s, block))
    # round to nearest e4m3: half a unit in the last place (3 mantissa bits) plus half the smallest subnormal
    s_full = ref_dequantize(torch.ones(shape).to(FP8), s, block)
    assert ((back - w).abs() <= w.abs() * 2**-4 + s_full * 2**-10).all()
    assert dequantize_blockwise(q, s, block, torch.bfloat16).dtype == torch.bfloat16


def test_zero_block_quantises_to_zero():
    w = torch.zeros(64, 64)
    w[:32, :32] = torch.randn(32, 32)
    q, s = quantize_blockwise(w, (32, 32))
    back = dequantize_blockwise(q, s, (32, 32))
    assert not back.isnan().any() and torch.equal(back[32:], torch.zeros(32, 64)) and (s > 0).all()


def test_w13_scales_are_gate_then_up():
    """Gate and up are separate checkpoint tensors: each is blocked from its own first row (I = 40 is not a
    multiple of the block), gate's scales first."""
    block = (16, 32)
    gate, gate_max = known_max_weight((2, 40, 64), block, seed=5)
    up, up_max = known_max_weight((2, 40, 64), block, seed=6)
    q, s = quantize_w13(torch.cat([gate, up], dim=1), block)
    assert s.shape == (2, 2 * 3, 2)
    assert torch.equal(s, torch.cat([gate_max, up_max], dim=1) / E4M3_MAX)
    assert same_bits(q, torch.cat([ref_quantize(gate, block)[0], ref_quantize(up, block)[0]], dim=1))
    assert torch.equal(dequantize_w13(q, s, block), ref_dequantize_w13(q, s, block))


def _fp8_experts(S, D, I, block, device=DEVICE):
    w13 = torch.randn(S, 2 * I, D, device=device) * D**-0.5
    w2 = torch.randn(S, D, I, device=device) * I**-0.5
    q13, s13 = ref_quantize_w13(w13, block)
    q2, s2 = ref_quantize(w2, block)
    return q13, q2, BlockScales(s13, s2, block)


def test_reference_kernel_dequantises_slot_by_slot():
    torch.manual_seed(1)
    q13, q2, sc = _fp8_experts(5, 64, 48, (16, 32), torch.device("cpu"))
    x, slot = torch.randn(30, 64), torch.randint(0, 5, (30,))
    w13, w2 = ref_dequantize_w13(q13, sc.w13, sc.block), ref_dequantize(q2, sc.w2, sc.block)
    want = swiglu_experts_reference(x, slot, w13, w2)
    assert torch.equal(swiglu_experts_reference(x, slot, q13, q2, sc), want)
    assert torch.equal(ops.swiglu_experts(x, slot, q13, q2, sc), want)  # CPU tensors: the reference


def test_config_json_quantization():
    base = json.loads((Path(__file__).parents[2] / "configs/models/qwen3-30b-a3b/config.json").read_text())
    assert parse_arch(base).quantization is None
    fp8 = dict(base, quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                          "weight_block_size": [128, 128]})
    assert parse_arch(fp8).quantization == Fp8Quantization((128, 128))
    with pytest.raises(ValueError, match="not supported"):
        parse_arch(dict(base, quantization_config={"quant_method": "gptq", "bits": 4}))


# ---- FP8 checkpoints (Hugging Face layout) ----


def save_fp8_copy(src: Path, dst: Path, block: tuple[int, int], dequantised: bool = False) -> Path:
    """The checkpoint at src as an FP8 one (fp8 weights + float32 `_scale_inv`, config quantization_config), or,
    with dequantised=True, as the unquantised checkpoint holding exactly the weights the FP8 one stands for (which
    is also what `quantization = "fp8"` forced on src serves). Quantised by `ref_quantize` (QUANTISED names)."""
    dst.mkdir(parents=True, exist_ok=True)
    out = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(f, "pt") as h:
            for name in h.keys():  # noqa: SIM118 (safe_open is no dict)
                out[name] = h.get_tensor(name)
    write_fp8_copy(out, src, dst, block, dequantised)
    return dst


def write_fp8_copy(weights: dict, src: Path, dst: Path, block: tuple[int, int], dequantised: bool) -> None:
    out = {}
    for name, t in weights.items():
        if QUANTISED.search(name):
            q, s = ref_quantize(t, block)
            if dequantised:
                out[name] = ref_dequantize(q, s, block, t.dtype)
            else:
                out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    if not dequantised:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(cfg))


def engine_for(model_dir: Path, device: str = "cpu", **model) -> RankEngine:
    arch = load_arch(model_dir)
    cfg = Config(model=ModelConfig(path=str(model_dir), **model), engine=EngineConfig(num_kv_blocks=128))
    launch = P.RankLaunch(rank_id=0, head_address="", model_dir=str(model_dir), eos_token_ids=[], device=device,
                          config=cfg)
    epoch = P.Epoch(epoch=0, rank_ids=[0], store_host="", store_port=0,
                    physical_to_logical=[list(range(arch.num_experts))] * len(arch.moe_layers),
                    slot_offsets=[0, arch.num_experts])
    return build_engine(launch, epoch, EpochGroup(None, 0, 0, 1, torch.device(device)))


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def hf_checkpoint(request, tmp_path_factory):
    from support import save_random_hf_model

    return save_random_hf_model(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture
def keep_fp8_on_cpu(monkeypatch):
    """fp8 expert slots kept in the model on the CPU too (served by the reference kernel)."""
    monkeypatch.setattr(model_fp8, "keeps_fp8", lambda device: True)


@pytest.mark.parametrize("block", [(128, 128), (16, 32)], ids=str)
def test_fp8_checkpoint_tokens_equal_dequantised_checkpoint(hf_checkpoint, block, tmp_path, monkeypatch):
    fp8_dir = save_fp8_copy(hf_checkpoint, tmp_path / "fp8", block)
    deq_dir = save_fp8_copy(hf_checkpoint, tmp_path / "deq", block, dequantised=True)
    with safe_open(fp8_dir / "model.safetensors", "pt") as h:
        names = list(h.keys())
        first_gate = next(n for n in names if n.endswith(("experts.0.w1.weight", "experts.0.gate_proj.weight")))
        assert h.get_tensor(first_gate).dtype == FP8
        assert any(n.endswith("q_proj.weight_scale_inv") for n in names) and "lm_head.weight_scale_inv" not in names
    want = greedy(engine_for(deq_dir), PROMPTS)
    dequantised = engine_for(fp8_dir)  # CPU: every weight dequantised at load
    assert dequantised.model.moe_blocks()[0].w13.dtype == torch.float32
    assert greedy(dequantised, PROMPTS) == want
    monkeypatch.setattr(model_fp8, "keeps_fp8", lambda device: True)
    kept = engine_for(fp8_dir)  # the GPU's layout: fp8 slots + scales
    block0 = kept.model.moe_blocks()[0]
    assert block0.w13.dtype == FP8 and block0.w13_scale.dtype == torch.float32 and block0.fp8_block == block
    assert greedy(kept, PROMPTS) == want
    # quantization = "none" dequantises even where fp8 slots could be kept
    assert engine_for(fp8_dir, quantization="none").model.moe_blocks()[0].w13.dtype == torch.float32


def test_fp8_dummy_weights_are_the_quantised_bf16_dummy_weights(keep_fp8_on_cpu):
    from eep_hpc.model.tiny import ensure_tiny_checkpoint

    path = Path(ensure_tiny_checkpoint())
    arch = load_arch(path)
    cfg = ModelConfig(path=str(path), load_format="dummy", quantization="fp8", seed=3)
    local = [list(range(arch.num_experts))] * len(arch.moe_layers)
    model = build_model(arch, cfg, path, local, 64, torch.device("cpu"), torch.float32)
    raw = DummySource(3, torch.device("cpu"))
    block, I, D = (128, 128), arch.moe_intermediate_size, arch.hidden_size
    q, s = ref_quantize(raw.get("model.layers.0.mlp.experts.2.up_proj.weight", (I, D)), block)
    moe = model.moe_blocks()[0]
    assert same_bits(moe.w13[2, I:], q)
    assert torch.equal(moe.w13_scale[2, moe.w13_scale.shape[1] // 2 :], s)
    attn = model.layers[0].self_attn
    qp, q_rows = "model.layers.0.self_attn.q_proj.weight", attn.qkv_split[0]  # q's rows lead the stacked qkv_proj
    round_trip = ref_dequantize(*ref_quantize(raw.get(qp, (q_rows, D)), block), block)
    assert torch.equal(attn.qkv_proj.weight[:q_rows], round_trip)
    # routers, embeddings and lm_head stay as drawn
    assert torch.equal(model.layers[0].mlp.gate.weight, raw.get("model.layers.0.mlp.gate.weight", (arch.num_experts, D)))
    assert torch.equal(model.lm_head.weight, raw.get("lm_head.weight", (arch.vocab_size, D)))


def _tiny_path() -> Path:
    from eep_hpc.model.tiny import ensure_tiny_checkpoint

    return Path(ensure_tiny_checkpoint())


def test_fp8_forced_on_a_checkpoint_kept_or_dequantised_gives_the_round_tripped_tokens(tmp_path, monkeypatch):
    """quantization = "fp8" on an unquantised checkpoint serves its weights round-tripped through fp8 (128 x 128
    blocks): the tokens of a checkpoint holding those weights, made here."""
    path = _tiny_path()
    want = greedy(engine_for(save_fp8_copy(path, tmp_path / "deq", (128, 128), dequantised=True)), PROMPTS, 16)
    assert greedy(engine_for(path, quantization="fp8"), PROMPTS, 16) == want
    monkeypatch.setattr(model_fp8, "keeps_fp8", lambda device: True)
    kept = engine_for(path, quantization="fp8")
    assert kept.model.moe_blocks()[0].w13.dtype == FP8
    assert greedy(kept, PROMPTS, 16) == want
    assert greedy(engine_for(path), PROMPTS, 16) != want, "fp8 rounding should change some token of the tiny model"


# ---- experts move with their scales ----


def _fp8_slots(L, S, I, D, block, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = [torch.randn(S, 2 * I, D, generator=g) for _ in range(L)]
    w2 = [torch.randn(S, D, I, generator=g) for _ in range(L)]
    q13, s13 = zip(*(ref_quantize_w13(w, block) for w in w13))
    q2, s2 = zip(*(ref_quantize(w, block) for w in w2))
    return SlotTensors(list(q13), list(q2), list(s13), list(s2))


def test_stage_experts_copies_scales_with_local_moves():
    old = _fp8_slots(2, 4, 24, 32, (16, 16), 0)
    # layer 1: global slot 0 now holds what local slot 3 held; slot 2 comes from another rank
    moves = [[1, 7, 0, 0, 0, 3], [1, 5, 1, 0, 2, 0]]
    staged, remote = stage_experts(0, moves, old, 0, 4, 2, (24, 32), FP8, torch.device("cpu"), like=old)
    assert remote == [moves[1]] and staged.w13_scale is not None
    for kind_new, kind_old in zip(staged.kinds(), old.kinds()):
        assert same_bits(kind_new[0], kind_old[0])  # layer 0 untouched
        assert same_bits(kind_new[1][0], kind_old[1][3]) and same_bits(kind_new[1][1], kind_old[1][1])
    with pytest.raises(ValueError, match="scales"):  # fp8 slots without their scales cannot be staged
        stage_experts(0, moves, SlotTensors(old.w13, old.w2), 0, 4, 2, (24, 32), FP8, torch.device("cpu"))
    with pytest.raises(ValueError, match="scales"):
        stage_experts(1, moves, None, 0, 4, 2, (24, 32), FP8, torch.device("cpu"))


def test_exchange_over_group_sends_scales_with_experts():
    """Two ranks (gloo, threads): each sends one fp8 expert of layer 1 to the other; bytes and scales arrive."""
    from torch import distributed as dist

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    L, S, I, D, block = 2, 3, 24, 32, (16, 16)
    olds = [_fp8_slots(L, S, I, D, block, seed) for seed in (10, 11)]
    # [layer, logical, src, dst, dst_global_slot, src_local_slot]; rank r holds global slots [3r, 3r + 3)
    moves = [[1, 0, 0, 1, 4, 2], [1, 1, 1, 0, 0, 1]]
    results, errors = [None, None], []

    def run(r):
        try:
            group = EpochGroup(connect_store("127.0.0.1", store.port), 5, r, 2, torch.device("cpu"), timeout_s=30,
                               purpose="xfer/")
            staged, _ = stage_experts(r, moves, olds[r], 3 * r, 3 * r + 3, L, (I, D), FP8, torch.device("cpu"),
                                           like=olds[r])
            staged.bytes_received = exchange_over_group(group, [0, 1], r, moves, olds[r], staged, 3 * r, L, (I, D))
            results[r] = staged
            group.destroy()
        except Exception as e:  # noqa: BLE001 (surfaced below)
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    for kind in range(4):
        assert same_bits(results[1].kinds()[kind][1][1], olds[0].kinds()[kind][1][2])  # global 4 = rank 1's local 1
        assert same_bits(results[0].kinds()[kind][1][0], olds[1].kinds()[kind][1][1])
        assert same_bits(results[0].kinds()[kind][0], olds[0].kinds()[kind][0])  # layer 0 untouched
    per_expert = sum(k[0][0].numel() * k[0].element_size() for k in olds[0].kinds())
    assert results[0].bytes_received == results[1].bytes_received == per_expert


def test_swap_experts_replaces_scales(keep_fp8_on_cpu):
    engine = engine_for(_tiny_path(), quantization="fp8")
    blocks = engine.model.moe_blocks()
    slots = SlotTensors.of_blocks(blocks)
    assert slots.w13_scale is not None and len(slots.kinds()) == 4
    moves = [[0, 0, 0, 0, 0, 1], [0, 1, 0, 0, 1, 0]]  # swap local slots 0 and 1 of layer 0
    S = blocks[0].w13.shape[0]
    staged, _ = stage_experts(0, moves, slots, 0, S, len(blocks), (0, 0), FP8, torch.device("cpu"), like=slots)
    before = blocks[0].w13_scale.clone()
    RankEngine.swap_experts(types.SimpleNamespace(model=engine.model, ep=None, runner=engine.runner), staged, None)
    assert torch.equal(blocks[0].w13_scale[0], before[1]) and torch.equal(blocks[0].w13_scale[1], before[0])
    assert blocks[0].w13_scale is staged.w13_scale[0] and blocks[0].w13.data_ptr() == staged.w13[0].data_ptr()
    with pytest.raises(ValueError, match="scales"):
        RankEngine.swap_experts(types.SimpleNamespace(model=engine.model, ep=None, runner=engine.runner),
                                SlotTensors(staged.w13, staged.w2), None)


# ---- the fp8 Triton kernel ----


FP8_SHAPES = [
    pytest.param(1, 4, 64, 32, (16, 32), id="one-row"),
    pytest.param(37, 8, 64, 32, (16, 32), id="tiny-blocks"),
    pytest.param(50, 3, 96, 48, (128, 128), id="ragged-one-block"),
    pytest.param(30, 4, 160, 96, (32, 32), id="ragged-k-tiles"),
    pytest.param(20, 5, 64, 48, (1, 64), id="per-channel"),
    pytest.param(8, 128, 2048, 768, (128, 128), id="qwen3-decode-1", marks=big),
    pytest.param(512, 128, 2048, 768, (128, 128), id="qwen3-decode-64", marks=big),
    pytest.param(4096, 128, 2048, 768, (128, 128), id="qwen3-prefill-512", marks=big),
    pytest.param(300, 16, 2048, 768, (1, 2048), id="qwen3-per-channel", marks=big),
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,S,D,I,block", FP8_SHAPES)
def test_swiglu_experts_fp8_triton(M, S, D, I, block, dtype):
    from eep_hpc.kernels.triton_moe import MoEConfig, swiglu_experts_triton

    torch.manual_seed(M * 7 + S)
    for cfg in (None, MoEConfig(16, 32, 32, 2, 4, 2)):
        q13, q2, sc = _fp8_experts(S, D, I, block)
        x = torch.randn(M, D, device=DEVICE).to(dtype)
        slot = torch.randint(0, S, (M,), device=DEVICE)
        out = torch.full_like(x, float("nan"))
        swiglu_experts_triton(x, slot, q13, q2, config=cfg, out=out, scales=sc)
        ref = swiglu_experts_reference(x.double(), slot, ref_dequantize_w13(q13, sc.w13, block, torch.float64),
                                       ref_dequantize(q2, sc.w2, block, torch.float64))
        assert rel_err(out, ref) <= TOL[dtype], (cfg, rel_err(out, ref))


@needs_kernels
def test_swiglu_experts_fp8_triton_skips_padding_rows():
    from eep_hpc.kernels.triton_moe import swiglu_experts_triton

    q13, q2, sc = _fp8_experts(6, 64, 32, (16, 32))
    x = torch.randn(40, 64, device=DEVICE)
    slot = torch.randint(0, 6, (40,), device=DEVICE)
    pad = torch.rand(40, device=DEVICE) < 0.3
    slot = torch.where(pad, torch.where(torch.rand(40, device=DEVICE) < 0.5, -1, 6), slot)
    out = torch.full_like(x, float("nan"))
    swiglu_experts_triton(x, slot, q13, q2, out=out, scales=sc)
    keep = ~pad
    ref = swiglu_experts_reference(x[keep].double(), slot[keep],
                                   ref_dequantize_w13(q13, sc.w13, sc.block, torch.float64),
                                   ref_dequantize(q2, sc.w2, sc.block, torch.float64))
    assert rel_err(out[keep], ref) <= TOL[torch.float32] and out[pad].isnan().all()


@needs_cuda
def test_ops_run_fp8_experts_in_triton_on_cuda():
    q13, q2, sc = _fp8_experts(5, 64, 32, (16, 32))
    x = torch.randn(30, 64, device="cuda", dtype=torch.bfloat16)
    slot = torch.randint(0, 5, (30,), device="cuda")
    got = ops.swiglu_experts(x, slot, q13, q2, sc)
    ref = swiglu_experts_reference(x.double(), slot, ref_dequantize_w13(q13, sc.w13, sc.block, torch.float64),
                                   ref_dequantize(q2, sc.w2, sc.block, torch.float64))
    assert rel_err(got, ref) <= TOL[torch.bfloat16]


# ---- the FP8 model on a GPU ----


def engine_logprobs(engine, prompts: list[list[int]], n: int, vocab: int) -> tuple[list, list]:
    """Greedy runs with every token's logprob (the whole vocabulary): per prompt its generated ids and the
    log-softmax rows [len(prompt) - 1 + n, vocab] that predict tokens 1.. of prompt + generated, on the CPU."""
    sampling = P.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=vocab, prompt_logprobs=vocab)
    for i, p in enumerate(prompts):
        engine.add(P.AddRequest(request_id=str(i), prompt_token_ids=p, sampling=sampling))
    ids = {str(i): [] for i in range(len(prompts))}
    rows = {str(i): {"prompt": [], "out": []} for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            ids[o.request_id] += o.new_token_ids
            for kind, lp in (("prompt", o.prompt_logprobs), ("out", o.logprobs)):
                for top_ids, top_lp in zip(lp.top_ids, lp.top_logprobs) if lp is not None else ():
                    row = torch.full((vocab,), float("nan"))
                    row[torch.tensor(top_ids)] = torch.tensor(top_lp)
                    rows[o.request_id][kind].append(row)
    out_ids, out_rows = [], []
    for i, p in enumerate(prompts):
        r = rows[str(i)]
        assert len(r["prompt"]) == len(p) - 1 and len(r["out"]) == len(ids[str(i)]) == n
        out_ids.append(ids[str(i)])
        out_rows.append(torch.stack(r["prompt"] + r["out"]))
        assert not out_rows[-1].isnan().any()
    return out_ids, out_rows


def full_logprob_errors(seqs, rows, ref, other) -> tuple[list, list]:
    """Per prompt, per predicted position: the RMS over the vocabulary of |rows - ref| and of |other - ref|, ref
    and other being transformers models run on the same sequences."""
    ours, theirs = [], []
    for seq, got in zip(seqs, rows):
        with torch.no_grad():
            want, alt = (torch.log_softmax(m(torch.tensor([seq], device=m.device)).logits[0, :-1].float().cpu(), -1)
                         for m in (ref, other))
        ours.append((got - want).pow(2).mean(-1).sqrt().tolist())
        theirs.append((alt - want).pow(2).mean(-1).sqrt().tolist())
    return ours, theirs


@needs_cuda
@pytest.mark.gpu
def test_fp8_checkpoint_on_gpu_keeps_fp8_experts_and_matches_dequantised(hf_checkpoint, tmp_path):
    """fp32 activations with fp8 experts on the GPU (no TF32): the greedy tokens of the dequantised checkpoint on
    the CPU, exactly. bf16 activations: logprobs (the whole vocabulary, prompt and 8 generated tokens) against
    transformers fp32 on the dequantised checkpoint, within twice transformers' own bf16 error there."""
    from support import hf_model
    from support import assert_within_bf16_error

    fp8_dir = save_fp8_copy(hf_checkpoint, tmp_path / "fp8", (16, 32))
    deq_dir = save_fp8_copy(hf_checkpoint, tmp_path / "deq", (16, 32), dequantised=True)
    want = greedy(engine_for(deq_dir), PROMPTS)
    gpu = engine_for(fp8_dir, device="cuda", dtype="float32")
    assert gpu.model.moe_blocks()[0].w13.dtype == FP8 and gpu.model.moe_blocks()[0].w13_scale.is_cuda
    assert greedy(gpu, PROMPTS) == want
    bf16 = engine_for(fp8_dir, device="cuda", dtype="bfloat16")
    assert bf16.model.moe_blocks()[0].w13.dtype == FP8
    vocab = load_arch(deq_dir).vocab_size
    ids, rows = engine_logprobs(bf16, PROMPTS, 8, vocab)
    seqs = [p + t for p, t in zip(PROMPTS, ids)]
    assert_within_bf16_error(*full_logprob_errors(seqs, rows, hf_model(deq_dir), hf_model(deq_dir, torch.bfloat16,
                                                                                           "cuda")))


def save_dummy_round_trip(src: Path, dst: Path, seed: int, device: str, block: tuple[int, int]) -> Path:
    """The checkpoint `load_format = "dummy", quantization = "fp8"` stands for: src's tensors (names, shapes) as
    drawn by the dummy source on `device` (its generator is the device's), QUANTISED ones round-tripped."""
    dst.mkdir(parents=True)
    raw = DummySource(seed, torch.device(device))
    with safe_open(src / "model.safetensors", "pt") as h:
        names = list(h.keys())  # noqa: SIM118 (safe_open is no dict)
        weights = {name: raw.get(name, tuple(h.get_slice(name).get_shape())).float().cpu() for name in names}
    write_fp8_copy(weights, src, dst, block, dequantised=True)
    return dst


@needs_cuda
@pytest.mark.gpu
def test_fp8_dummy_on_gpu_is_half_the_expert_bytes_and_the_round_tripped_model(tmp_path):
    path = _tiny_path()
    bf16 = engine_for(path, device="cuda", dtype="bfloat16", load_format="dummy")
    fp8 = engine_for(path, device="cuda", dtype="bfloat16", load_format="dummy", quantization="fp8")
    b, f = bf16.model.moe_blocks()[0], fp8.model.moe_blocks()[0]
    assert f.w13.element_size() * 2 == b.w13.element_size() and f.w13.shape == b.w13.shape
    del bf16, fp8
    # fp32 activations: the greedy tokens of a checkpoint holding the dummy weights round-tripped here, on the CPU
    fp8 = engine_for(path, device="cuda", dtype="float32", load_format="dummy", quantization="fp8", seed=5)
    assert fp8.model.moe_blocks()[0].w13.dtype == FP8
    twin = save_dummy_round_trip(path, tmp_path / "twin", 5, "cuda", (128, 128))
    assert greedy(fp8, PROMPTS, 16) == greedy(engine_for(twin), PROMPTS, 16)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_fp8_experts_grow_and_shrink_across_two_gpus_keep_token_ids(tmp_path):
    """fp8 experts and their scales move between GPUs (NIXL or the all-to-all) on grow and shrink; the greedy token
    ids stay those of the checkpoint holding the round-tripped weights, on the CPU (fp32 activations)."""
    from support import start_head
    from support import PROMPT_IDS, greedy_ids, id_token_model, scale

    tiny = _tiny_path()
    want = greedy(engine_for(save_fp8_copy(tiny, tmp_path / "deq", (128, 128), dequantised=True)), PROMPT_IDS, 24)
    head = start_head(tmp_path / "gpu", ranks=1, parallel={"device": "cuda"},
                      model={"path": str(id_token_model(tiny, tmp_path / "ids")), "dtype": "float32",
                             "quantization": "fp8"})
    got = {}
    try:
        got["one"] = greedy_ids(head.url, head.model, PROMPT_IDS, 24)
        grown = scale(head, "grow", {"n": 1})
        members = head.state()["members"]
        got["two"] = greedy_ids(head.url, head.model, PROMPT_IDS, 24)
        shrunk = scale(head, "shrink", {"rank_ids": [members[0]]})
        got["after"] = greedy_ids(head.url, head.model, PROMPT_IDS, 24)
    finally:
        head.stop()
    assert grown["phase"] == shrunk["phase"] == "DONE", (grown, shrunk)
    assert len(members) == 2
    for phase, ids in got.items():
        assert ids == want, phase
