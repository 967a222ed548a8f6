"""The attention prologue (q/k RMSNorm + Neox RoPE + KV-cache write): reference vs the model's pieces, Triton vs
reference.

The CPU tests always run: the reference equals the step-by-step composition the model does today (q/k/v split,
`layers.RMSNorm`, `layers.RotaryEmbedding`, `attention.write_kv`) exactly, slot -1 leaving the cache untouched.
The Triton tests run on a CUDA GPU, or on the CPU in Triton's interpreter (small shapes; see kernel_checks.py), with
test_kernels.py's conventions: fresh random inputs, q output and caches filled with NaN first, compared with the
reference computed in float64 on the same (already rounded) inputs by ||out - ref|| / ||ref|| (fp32 <= 1e-5,
bf16 <= 1e-2); v is copied exactly and unwritten cache rows stay NaN.
"""

from __future__ import annotations


import pytest
import torch

from kernel_checks import DEVICE, DTYPES, INTERPRET, TOL, big, needs_cuda, needs_kernels, rel_err

from eep_hpc.kernels.attention import write_kv
from eep_hpc.kernels.norm import rms_norm_reference
from eep_hpc.kernels.rope import (
    qk_norm_rope_write_kv,
    qk_norm_rope_write_kv_reference,
    rope_neox_reference,
)
from eep_hpc.model.layers import RMSNorm, RotaryEmbedding


EPS = 1e-6
MAX_POS = 4096
BLOCK_SIZE = 16
NAN = float("nan")
CPU = torch.device("cpu")
ALL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(T, Hq, Hkv, D, dtype, norm, strided=False, device=DEVICE, fill=NAN):
    """Inputs of one call (as keyword arguments) and the RotaryEmbedding of its tables: random positions in
    [0, MAX_POS), distinct random slots (never the cache's last one, where a plain write_kv of slot -1 would land)
    with about one token in six at -1 (token 1 always, when T > 1), caches filled with `fill`. `strided`: qkv rows
    are views into wider rows (the last dim stays contiguous)."""
    width = (Hq + 2 * Hkv) * D
    pad = 24 if strided else 0
    qkv = torch.randn(T, width + pad, device=device).to(dtype)[:, :width]
    rope = RotaryEmbedding(D, MAX_POS, 1e6).to(device)
    positions = torch.randint(0, MAX_POS, (T,), device=device)
    num_blocks = T // BLOCK_SIZE + 3
    slots = torch.randperm(num_blocks * BLOCK_SIZE - 1, device=device)[:T]
    slots[torch.rand(T, device=device) < 0.15] = -1
    slots[1:2] = -1
    qw, kw = (None, None)
    if norm:
        qw, kw = ((1 + 0.1 * torch.randn(D, device=device)).to(dtype) for _ in range(2))
    shape = (num_blocks, BLOCK_SIZE, Hkv, D)
    k_cache, v_cache = (
        torch.full(shape, fill, device=device).to(dtype) for _ in range(2)
    )
    case = {
        "qkv": qkv,
        "positions": positions,
        "cos": rope.cos,
        "sin": rope.sin,
        "num_heads": Hq,
        "num_kv_heads": Hkv,
        "head_dim": D,
        "q_norm_weight": qw,
        "k_norm_weight": kw,
        "eps": EPS,
        "k_cache": k_cache,
        "v_cache": v_cache,
        "slot_mapping": slots,
    }
    return case, rope


def _double(case):
    """The same call in float64 (cos/sin stay the fp32 tables), on fresh NaN caches."""
    d = dict(case)
    d["qkv"] = case["qkv"].double()
    for name in ("q_norm_weight", "k_norm_weight"):
        d[name] = None if case[name] is None else case[name].double()
    for name in ("k_cache", "v_cache"):
        d[name] = torch.full_like(case[name], NAN, dtype=torch.float64)
    return d


# ---- CPU: the reference is the model's composition (always run) ----


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
def test_reference_is_the_models_composition(norm, dtype):
    torch.manual_seed(7)
    T, Hq, Hkv, D = 23, 4, 2, 16
    case, rope = _case(T, Hq, Hkv, D, dtype, norm, strided=True, device=CPU, fill=0.5)
    qkv, pos, slots = case["qkv"], case["positions"], case["slot_mapping"]
    slots[7] = -1
    k_before, v_before = case["k_cache"].clone(), case["v_cache"].clone()

    # what Attention.forward does today, step by step
    with torch.no_grad():
        q = qkv[:, : Hq * D].reshape(T, Hq, D)
        k = qkv[:, Hq * D : (Hq + Hkv) * D].reshape(T, Hkv, D)
        v = qkv[:, (Hq + Hkv) * D :].reshape(T, Hkv, D)
        if norm:
            q_norm, k_norm = RMSNorm(D, EPS).to(dtype), RMSNorm(D, EPS).to(dtype)
            q_norm.weight.copy_(case["q_norm_weight"])
            k_norm.weight.copy_(case["k_norm_weight"])
            q, k = q_norm(q), k_norm(k)
        q, k = rope(q, pos), rope(k, pos)
        k_want, v_want = k_before.clone(), v_before.clone()
        keep = slots >= 0
        write_kv(k[keep], v[keep], k_want, v_want, slots[keep])

    got = qk_norm_rope_write_kv_reference(**case)
    assert got.dtype == dtype and got.shape == (T, Hq, D)
    assert torch.equal(got, q)
    assert torch.equal(case["k_cache"], k_want) and torch.equal(case["v_cache"], v_want)
    # slot -1 wrote nothing (a plain write_kv would have hit the last slot); the
    # written rows did change
    written = torch.zeros(k_before.shape[0] * BLOCK_SIZE, dtype=torch.bool)
    written[slots[keep]] = True
    assert (~keep).sum() >= 2 and not written[-1]
    for cache, before in ((case["k_cache"], k_before), (case["v_cache"], v_before)):
        flat, flat_before = cache.view(-1, Hkv, D), before.view(-1, Hkv, D)
        assert torch.equal(flat[~written], flat_before[~written])
        assert not torch.equal(flat[written], flat_before[written])
    assert torch.equal(case["v_cache"].view(-1, Hkv, D)[slots[keep]], v[keep])
    # the dispatcher keeps the reference on the CPU
    again = dict(case, k_cache=k_before.clone(), v_cache=v_before.clone())
    assert torch.equal(qk_norm_rope_write_kv(**again), q)
    assert torch.equal(again["k_cache"], k_want)


def test_reference_with_wider_norm_weights():
    """fp32 norm weights (RMSNorm's default) on bf16 activations: q comes back in fp32
    as the norm returns it, k is rounded to the cache's bf16 on the way in."""
    torch.manual_seed(9)
    T, Hq, Hkv, D = 11, 4, 2, 16
    case, rope = _case(T, Hq, Hkv, D, torch.bfloat16, True, device=CPU, fill=0.0)
    for name in ("q_norm_weight", "k_norm_weight"):
        case[name] = case[name].float()
    qkv, pos, slots = case["qkv"], case["positions"], case["slot_mapping"]
    q = rms_norm_reference(
        qkv[:, : Hq * D].reshape(T, Hq, D), case["q_norm_weight"], EPS
    )
    k = rms_norm_reference(
        qkv[:, Hq * D : (Hq + Hkv) * D].reshape(T, Hkv, D), case["k_norm_weight"], EPS
    )
    q, k = rope(q, pos), rope(k, pos)
    got = qk_norm_rope_write_kv_reference(**case)
    assert got.dtype == torch.float32 and torch.equal(got, q)
    keep = slots >= 0
    k_cache = case["k_cache"].view(-1, Hkv, D)
    assert k_cache.dtype == torch.bfloat16
    assert torch.equal(k_cache[slots[keep]], k[keep].bfloat16())


def test_rope_reference_matches_rotary_embedding():
    """rope_neox_reference is the model's RoPE, and that is the Neox formula (layers.RotaryEmbedding's own code,
    before it delegated to rope_neox_reference)."""
    torch.manual_seed(3)
    rope = RotaryEmbedding(32, 512, 1e4)
    pos = torch.randint(0, 512, (9,))
    for dtype in ALL_DTYPES:
        x = torch.randn(9, 3, 32).to(dtype)
        cos, sin = rope.cos[pos][:, None, :], rope.sin[pos][:, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(dtype)
        assert torch.equal(rope_neox_reference(x, pos, rope.cos, rope.sin), want)
        assert torch.equal(rope(x, pos), want)
    # fp64 stays fp64 (the tests' reference), close to fp32
    x = torch.randn(9, 3, 32, dtype=torch.float64)
    got = rope_neox_reference(x, pos, rope.cos, rope.sin)
    assert got.dtype == torch.float64 and rel_err(got, rope(x.float(), pos)) < 1e-6


def test_reference_empty_batch():
    case, _ = _case(0, 4, 2, 16, torch.float32, True, device=CPU, fill=0.0)
    assert qk_norm_rope_write_kv_reference(**case).shape == (0, 4, 16)
    assert not case["k_cache"].any() and not case["v_cache"].any()


# ---- Triton vs reference ----


def _check_against_reference(case, q):
    """q and the caches of a Triton call against the float64 reference on the same inputs."""
    dtype, Hkv, D = case["qkv"].dtype, case["num_kv_heads"], case["head_dim"]
    ref_case = _double(case)
    q_ref = qk_norm_rope_write_kv_reference(**ref_case)
    assert q.shape == q_ref.shape and q.dtype == dtype
    assert rel_err(q, q_ref) <= TOL[dtype], rel_err(q, q_ref)
    slots = case["slot_mapping"]
    valid = slots[slots >= 0]
    num_slots = case["k_cache"].shape[0] * BLOCK_SIZE
    written = torch.zeros(num_slots, dtype=torch.bool, device=slots.device)
    written[valid] = True
    for name in ("k_cache", "v_cache"):
        flat, ref = case[name].view(-1, Hkv, D), ref_case[name].view(-1, Hkv, D)
        err = rel_err(flat[written], ref[written])
        assert err <= TOL[dtype], (name, err)
        assert flat[~written].isnan().all(), (
            f"{name}: a row outside the slots was written"
        )
    # v: copied bit for bit
    v = case["qkv"][:, (case["num_heads"] + Hkv) * D :].reshape(-1, Hkv, D)
    assert torch.equal(case["v_cache"].view(-1, Hkv, D)[valid], v[slots >= 0])


# (T, Hq, Hkv, D): the tiny model's heads and Qwen3-30B-A3B's. One program per token: the interpreter, which runs
# programs one after another, takes 40 tokens for the GPU's 300, and Qwen3's heads for a few tokens only.
MANY = 40 if INTERPRET else 300
SHAPES = [pytest.param(T, 4, 2, 16, id=f"{T}-tiny") for T in (0, 1, 5, MANY)] + [
    pytest.param(T, 32, 4, 128, id=f"{T}-qwen3-30b-a3b", marks=[big] if T == 300 else []) for T in (0, 1, 5, 300)
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("norm", [True, False], ids=["qk-norm", "no-norm"])
@pytest.mark.parametrize("T,Hq,Hkv,D", SHAPES)
def test_triton_matches_reference(T, Hq, Hkv, D, norm, dtype):
    from eep_hpc.kernels.triton_rope import qk_norm_rope_write_kv_triton

    torch.manual_seed(T * 13 + D)
    for strided in (False, True):
        case, _ = _case(T, Hq, Hkv, D, dtype, norm, strided=strided)
        q = torch.full((T, Hq, D), NAN, dtype=dtype, device=DEVICE)
        assert qk_norm_rope_write_kv_triton(**case, out=q) is q
        _check_against_reference(case, q)


@needs_kernels
@pytest.mark.parametrize("Hq,Hkv,D", [(2, 1, 64), (3, 1, 256), (6, 2, 24)])
def test_triton_other_head_shapes(Hq, Hkv, D):
    """MQA, Dh 256 (fewer heads a program), a head dim that is no power of two
    (masked halves)."""
    from eep_hpc.kernels.triton_rope import qk_norm_rope_write_kv_triton

    torch.manual_seed(Hq * D)
    for norm in (True, False):
        case, _ = _case(9, Hq, Hkv, D, torch.float32, norm, strided=True)
        _check_against_reference(case, qk_norm_rope_write_kv_triton(**case))


@needs_kernels
def test_triton_promotes_like_the_reference():
    """Norm weights of a wider dtype than the activations: q comes back in the promoted dtype (as rms_norm_reference
    returns it), the caches keep theirs."""
    from eep_hpc.kernels.triton_rope import qk_norm_rope_write_kv_triton

    torch.manual_seed(5)
    act, wdt = (torch.float16, torch.float32)
    case, _ = _case(17, 4, 2, 16, act, True)
    for name in ("q_norm_weight", "k_norm_weight"):
        case[name] = case[name].to(wdt)
    q = qk_norm_rope_write_kv_triton(**case)
    ref_case = dict(case)
    for name in ("k_cache", "v_cache"):
        ref_case[name] = torch.full_like(case[name], NAN)
    q_ref = qk_norm_rope_write_kv_reference(**ref_case)
    assert q.dtype == q_ref.dtype == torch.float32 and case["k_cache"].dtype == act
    assert rel_err(q, q_ref) <= 1e-3
    slots = case["slot_mapping"][case["slot_mapping"] >= 0]
    for name in ("k_cache", "v_cache"):
        got = case[name].view(-1, 2, 16)[slots]
        assert rel_err(got, ref_case[name].view(-1, 2, 16)[slots]) <= 1e-3


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_in_a_cuda_graph(dtype):
    """Captured once with static buffers, replayed on new tokens, positions and slots
    (padding at -1)."""
    from eep_hpc.kernels.triton_rope import qk_norm_rope_write_kv_triton

    torch.manual_seed(11)
    case, _ = _case(16, 32, 4, 128, dtype, True)
    static = dict(case)
    q = torch.empty(16, 32, 128, dtype=dtype, device=DEVICE)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        qk_norm_rope_write_kv_triton(**static, out=q)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        qk_norm_rope_write_kv_triton(**static, out=q)
    for seed in (1, 2):
        torch.manual_seed(seed)
        fresh, _ = _case(16, 32, 4, 128, dtype, True)
        fresh["slot_mapping"][12:] = -1  # graph padding
        for name in ("qkv", "positions", "slot_mapping"):
            static[name].copy_(fresh[name])
        static["k_cache"].fill_(NAN)
        static["v_cache"].fill_(NAN)
        q.fill_(NAN)
        graph.replay()
        torch.cuda.synchronize()
        _check_against_reference(static, q)


@needs_cuda
def test_dispatch_picks_triton_on_cuda():
    from eep_hpc.kernels.triton_rope import qk_norm_rope_write_kv_triton

    torch.manual_seed(2)
    case, _ = _case(33, 8, 2, 64, torch.bfloat16, True)
    again = dict(case)
    for name in ("k_cache", "v_cache"):
        again[name] = case[name].clone()
    q = qk_norm_rope_write_kv(**case)
    same = {"rtol": 0, "atol": 0, "equal_nan": True}
    torch.testing.assert_close(qk_norm_rope_write_kv_triton(**again), q, **same)
    torch.testing.assert_close(again["k_cache"], case["k_cache"], **same)
    _check_against_reference(case, q)
