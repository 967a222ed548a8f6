"""One token's experts and their weighted sum (`triton_moe_one_token.py`, batch-1 decode on one rank) against the
weighted sum of the float64 reference experts; `ops.swiglu_experts_combined` picks it only where it applies.

As in test_kernels.py: the output poisoned with NaN first, ||out - ref|| / ||ref|| within 1e-5 (fp32) or 1e-2
(bf16); on the CPU through Triton's interpreter (small shapes).
"""

from __future__ import annotations

import pytest
import torch

from kernel_checks import DEVICE, DTYPES, TOL, big, needs_cuda, needs_kernels, rel_err

from eep_hpc.kernels import ops
from eep_hpc.kernels.moe import swiglu_experts_reference


def _case(k, S, D, I, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, D, generator=gen).to(DEVICE, dtype)
    slot = torch.randperm(S, generator=gen)[:k].to(DEVICE)
    w13 = (torch.randn(S, 2 * I, D, generator=gen) * D**-0.5).to(DEVICE, dtype)
    w2 = (torch.randn(S, D, I, generator=gen) * I**-0.5).to(DEVICE, dtype)
    weights = torch.softmax(torch.randn(1, k, generator=gen), -1).to(DEVICE, dtype)
    return x, slot, weights, w13, w2


def _reference(x, slot, weights, w13, w2):
    """sum_j weights[j] * expert_{slot[j]}(x) in float64, pairs outside [0, S) left out."""
    keep = (slot >= 0) & (slot < w13.shape[0])
    pairs = swiglu_experts_reference(x.double().expand(int(keep.sum()), -1), slot[keep], w13.double(), w2.double())
    return (weights.double().reshape(-1)[keep][:, None] * pairs).sum(0, keepdim=True)


SHAPES = [
    pytest.param(8, 16, 64, 32, id="k8"),
    pytest.param(2, 5, 40, 24, id="ragged"),
    pytest.param(1, 3, 48, 16, id="k1"),
    pytest.param(8, 128, 2048, 768, id="qwen3", marks=big),
]
# the model takes this path in bf16/fp16 only: at Qwen3's shapes fp32 tiles (twice the registers) took ptxas minutes


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,S,D,I", SHAPES)
def test_one_token_experts_match_the_reference(k, S, D, I, dtype):
    if dtype == torch.float32 and D > 256:
        pytest.skip("fp32 at full size: not a path the model takes")
    from eep_hpc.kernels.triton_moe_one_token import OneTokenConfig, one_token_experts_triton

    x, slot, weights, w13, w2 = _case(k, S, D, I, dtype, seed=k * 100 + D)
    ref = _reference(x, slot, weights, w13, w2)
    # the picked config, then K tiles that do not divide D and I (ragged last steps) and single columns
    for cfg in (None, OneTokenConfig(8, 32, 4, 16), OneTokenConfig(1, 64, 1, 64, num_warps=2)):
        out = torch.full((1, D), float("nan"), dtype=dtype, device=DEVICE)
        one_token_experts_triton(x, slot, weights, w13, w2, config=cfg, out=out)
        assert rel_err(out, ref) <= TOL[dtype], (cfg, rel_err(out, ref))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padding_pairs_add_nothing(dtype):
    """Slot -1 (a graph's padding, an idle rank's zero rows) and a slot past this rank's are skipped: the sum of the
    others; with every pair padding the token gets zeros, not garbage from unwritten intermediates."""
    from eep_hpc.kernels.triton_moe_one_token import one_token_experts_triton

    k, S, D, I = 8, 16, 64, 32
    x, slot, weights, w13, w2 = _case(k, S, D, I, dtype, seed=7)
    slot[2], slot[5] = -1, S
    out = one_token_experts_triton(x, slot, weights, w13, w2)
    assert rel_err(out, _reference(x, slot, weights, w13, w2)) <= TOL[dtype]
    none = one_token_experts_triton(x, torch.full_like(slot, -1), weights, w13, w2)
    assert torch.equal(none, torch.zeros_like(none))


@needs_kernels
def test_the_sum_is_the_same_on_every_run():
    from eep_hpc.kernels.triton_moe_one_token import one_token_experts_triton

    x, slot, weights, w13, w2 = _case(8, 16, 64, 32, torch.float32, seed=3)
    first = one_token_experts_triton(x, slot, weights, w13, w2)
    assert all(torch.equal(first, one_token_experts_triton(x, slot, weights, w13, w2)) for _ in range(3))


def test_cpu_combined_experts_are_the_weighted_sum_of_the_experts():
    """Off the GPU (and for anything but one token) ops.swiglu_experts_combined is the two steps it replaces, bit
    for bit."""
    torch.manual_seed(0)
    T, k, S, D, I = 3, 4, 6, 32, 16
    x = torch.randn(T, D)
    slot = torch.randint(0, S, (T * k,))
    w13, w2 = torch.randn(S, 2 * I, D) * D**-0.5, torch.randn(S, D, I) * I**-0.5
    weights = torch.softmax(torch.randn(T, k), -1)
    expected = ops.weighted_sum(ops.swiglu_experts(x, slot, w13, w2).view(T, k, D), weights)
    assert torch.equal(ops.swiglu_experts_combined(x, slot, weights, w13, w2), expected)
    one = ops.swiglu_experts_combined(x[:1], slot[:k], weights[:1], w13, w2)
    assert torch.equal(one, ops.weighted_sum(ops.swiglu_experts(x[:1], slot[:k], w13, w2).view(1, k, D), weights[:1]))


@needs_cuda
def test_ops_take_the_one_token_kernels_on_the_gpu(monkeypatch):
    """A bf16 token on CUDA goes through the two one-token kernels (no weighted-sum launch) and agrees with the
    grouped GEMMs + weighted sum it replaces (EEP_HPC_MOE_ONE_TOKEN=0)."""
    from eep_hpc.kernels import triton_combine

    x, slot, weights, w13, w2 = _case(8, 32, 256, 128, torch.bfloat16, seed=11)
    sums = []
    real = triton_combine.weighted_sum_triton
    monkeypatch.setattr(triton_combine, "weighted_sum_triton", lambda *a: sums.append(1) or real(*a))
    fused = ops.swiglu_experts_combined(x, slot, weights, w13, w2)
    assert sums == []
    monkeypatch.setenv("EEP_HPC_MOE_ONE_TOKEN", "0")
    apart = ops.swiglu_experts_combined(x, slot, weights, w13, w2)
    assert sums == [1]
    ref = _reference(x, slot, weights, w13, w2)
    assert rel_err(fused, ref) <= TOL[torch.bfloat16] and rel_err(apart, ref) <= TOL[torch.bfloat16]


def test_configs_at_qwen3_shapes(monkeypatch):
    """The config timed on the H100 (results/README.md, fifth round): 16 columns of I per (pair) program and 256 of D
    per step for w13 (384 programs), 4 columns of D per w2 program (512 programs) with all of I = 768 in one step."""
    from eep_hpc.kernels import triton_linear
    from eep_hpc.kernels.triton_moe_one_token import OneTokenConfig, pick_config

    monkeypatch.setattr(triton_linear, "_NUM_SMS", {0: 132})
    cfg = pick_config(8, 2048, 768, torch.bfloat16, torch.device("cuda", 0))
    assert cfg == OneTokenConfig(16, 256, 4, 1024)
