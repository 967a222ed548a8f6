"""The skinny GEMM (`triton_linear.py`, the decode path of `ops.linear`) against x @ W.T in float64.

Same checks as test_kernels.py: fresh random inputs, the output poisoned with NaN first, ||out - ref|| / ||ref||
within 1e-5 (fp32, IEEE dots) or 1e-2 (bf16 operands and output). Both inner products (the one-row FMA path and the
tl.dot path), split-K with ragged K, ragged N, bias, leading dimensions, and the configs picked at Qwen3-30B-A3B
shapes (no GPU needed for those).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, DTYPES, TOL, big, needs_kernels, rel_err

from eep_hpc.kernels import ops

# (M, N, K): one row, a few rows, 16 rows; ragged N and K
LINEAR_SHAPES = [
    pytest.param(1, 64, 128, id="1x128x64"),
    pytest.param(1, 37, 100, id="1-ragged"),
    pytest.param(3, 40, 96, id="3-ragged"),
    pytest.param(16, 48, 64, id="16"),
    pytest.param(7, 130, 272, id="7-ragged-long-k"),
    pytest.param(1, 5120, 2048, id="qwen3-qkv-1", marks=big),
    pytest.param(1, 2048, 4096, id="qwen3-o-1", marks=big),
    pytest.param(1, 128, 2048, id="qwen3-gate-1", marks=big),
    pytest.param(8, 5120, 2048, id="qwen3-qkv-8", marks=big),
    pytest.param(16, 2048, 4096, id="qwen3-o-16", marks=big),
]


def _configs(M):
    from eep_hpc.kernels.triton_linear import LinearConfig

    dot = [LinearConfig(16, 16, 32, 1, 4, 2), LinearConfig(16, 32, 64, 4, 4, 3)]  # the second splits K
    one = [LinearConfig(1, 4, 32, 1, 4, 1), LinearConfig(1, 8, 64, 4, 4, 1), LinearConfig(1, 1, 128, 2, 4, 1)]
    return [None] + dot + (one if M == 1 else [])


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,N,K", LINEAR_SHAPES)
def test_skinny_linear_triton(M, N, K, dtype):
    from eep_hpc.kernels.triton_linear import skinny_linear_triton

    torch.manual_seed(M * 1000 + N + K)
    for cfg in _configs(M):
        for has_bias in (False, True):
            x = torch.randn(M, K, device=DEVICE).to(dtype)
            w = (torch.randn(N, K, device=DEVICE) * K**-0.5).to(dtype)
            b = torch.randn(N, device=DEVICE).to(dtype) if has_bias else None
            out = torch.full((M, N), float("nan"), dtype=dtype, device=DEVICE)
            skinny_linear_triton(x, w, b, config=cfg, out=out)
            ref = F.linear(x.double(), w.double(), None if b is None else b.double())
            assert rel_err(out, ref) <= TOL[dtype], (cfg, has_bias, rel_err(out, ref))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_skinny_linear_leading_dims_and_strided_rows(dtype):
    """x [..., K] keeps its leading shape; rows of a wider tensor (row stride > K) are read in place."""
    from eep_hpc.kernels.triton_linear import skinny_linear_triton

    torch.manual_seed(5)
    w = (torch.randn(24, 48, device=DEVICE) * 48**-0.5).to(dtype)
    x = torch.randn(2, 3, 48, device=DEVICE).to(dtype)
    out = skinny_linear_triton(x, w)
    assert out.shape == (2, 3, 24)
    assert rel_err(out, F.linear(x.double(), w.double())) <= TOL[dtype]
    wide = torch.randn(4, 80, device=DEVICE).to(dtype)
    rows = wide[:, 16:64]  # row stride 80
    assert rel_err(skinny_linear_triton(rows, w), F.linear(rows.double(), w.double())) <= TOL[dtype]
    one = wide[1:2, 16:64]
    assert rel_err(skinny_linear_triton(one, w), F.linear(one.double(), w.double())) <= TOL[dtype]


@needs_kernels
def test_skinny_linear_is_deterministic_with_split_k():
    """Split-K sums its partials in a fixed order (no atomics): the same bits on every call."""
    from eep_hpc.kernels.triton_linear import LinearConfig, skinny_linear_triton

    torch.manual_seed(9)
    x, w = torch.randn(1, 256, device=DEVICE), torch.randn(40, 256, device=DEVICE)
    for cfg in (LinearConfig(1, 8, 32, 8, 4, 1), LinearConfig(16, 16, 32, 8, 4, 2)):
        first = skinny_linear_triton(x, w, config=cfg)
        assert torch.equal(first, skinny_linear_triton(x, w, config=cfg))


def test_ops_linear_keeps_f_linear_on_the_cpu(monkeypatch):
    x, w, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(8)
    assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))
    monkeypatch.setenv("EEP_HPC_SKINNY_GEMM", "0")
    assert not ops.skinny_gemm_enabled()
    assert torch.equal(ops.linear(x, w), F.linear(x, w))


def test_model_projections_go_through_ops_linear(monkeypatch):
    """qkv_proj, o_proj, the router gate and the LM head are `layers.Linear` (ops.linear), with nn.Linear's
    parameters and names."""
    import inspect

    from torch import nn

    from eep_hpc.model.decoder import MoEForCausalLM
    from eep_hpc.model.layers import Attention, DenseMLP, Linear
    from eep_hpc.model.moe import SparseMoE

    calls = []
    real = ops.linear
    monkeypatch.setattr(ops, "linear", lambda x, w, b=None: calls.append(tuple(w.shape)) or real(x, w, b))
    lin = Linear(16, 8, bias=True)
    assert isinstance(lin, nn.Linear) and set(dict(lin.named_parameters())) == {"weight", "bias"}
    x = torch.randn(2, 16)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias)) and calls == [(8, 16)]
    attn = Attention(32, 4, 2, 8, True, 1e-6, None)
    assert isinstance(attn.qkv_proj, Linear) and isinstance(attn.o_proj, Linear)
    mlp = DenseMLP(16, 24)
    assert all(isinstance(m, Linear) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    assert isinstance(SparseMoE(16, 8, 4, 2, True, 0, 4).gate, Linear)
    assert "self.lm_head = Linear(" in inspect.getsource(MoEForCausalLM.__init__)


def test_configs_at_qwen3_shapes(monkeypatch):
    """What the picker gives on a 132-SM GPU: enough programs to cover every SM, split-K only where N is narrow,
    whole K tiles, and the one-row path only for M = 1."""
    from eep_hpc.kernels import triton_linear
    from eep_hpc.kernels.triton_linear import pick_config

    monkeypatch.setattr(triton_linear, "_num_sms", lambda device: 132)
    cuda = torch.device("cuda")
    for M in (1, 2, 4, 8, 16):
        for name, N, K in (("qkv", 5120, 2048), ("o", 2048, 4096), ("gate", 128, 2048), ("lm_head", 151936, 2048)):
            cfg = pick_config(M, N, K, torch.bfloat16, cuda)
            programs = -(-N // cfg.BLOCK_N) * cfg.SPLIT_K
            assert (cfg.BLOCK_M == 1) == (M == 1), (M, name, cfg)
            assert K % (cfg.BLOCK_K * cfg.SPLIT_K) == 0, (M, name, cfg)
            assert programs >= 132 or name == "gate", (M, name, cfg, programs)
            assert cfg.BLOCK_N * cfg.BLOCK_K * 2 <= 32 * 1024, (M, name, cfg)  # registers / shared memory per step
    assert pick_config(1, 5120, 2048, torch.bfloat16, cuda) == triton_linear.LinearConfig(1, 16, 512, 1, 4, 1)
    assert pick_config(1, 128, 2048, torch.bfloat16, cuda).SPLIT_K == 1  # 128 one-row programs, one K step each


# (N, K, residual, keep_normed): the first layer's norm (no residual), a later one, ragged K, split K
NORM_LINEAR_CASES = [
    pytest.param(48, 64, False, False, None, id="embedding-row"),
    pytest.param(40, 96, True, True, None, id="residual-keep-normed"),
    pytest.param(37, 100, True, False, "ragged", id="ragged"),
    pytest.param(24, 256, True, True, "split", id="split-k"),
    pytest.param(5120, 2048, True, False, None, id="qwen3-qkv", marks=big),
    pytest.param(128, 2048, True, True, None, id="qwen3-gate", marks=big),
]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K,has_residual,keep_normed,cfg_name", NORM_LINEAR_CASES)
def test_rms_norm_linear_one_row(N, K, has_residual, keep_normed, cfg_name, dtype):
    """One kernel for a batch-1 layer's norm and the projection after it: the projection of the norm within the
    tolerance, the sum with the residual bit for bit what the norm kernel writes, the normalised row within one
    rounding of it (its 1/rms is summed in another order), the inputs untouched."""
    from eep_hpc.kernels.triton_linear import LinearConfig, rms_norm_linear_triton
    from eep_hpc.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton

    cfg = {None: None, "ragged": LinearConfig(1, 4, 32, 1, 4, 1), "split": LinearConfig(1, 8, 32, 4, 4, 1)}[cfg_name]
    torch.manual_seed(N + K)
    x = torch.randn(1, K, device=DEVICE).to(dtype)
    residual = torch.randn(1, K, device=DEVICE).to(dtype) if has_residual else None
    nw = (1 + 0.1 * torch.randn(K, device=DEVICE)).to(dtype)
    w = (torch.randn(N, K, device=DEVICE) * K**-0.5).to(dtype)
    x0, r0 = x.clone(), None if residual is None else residual.clone()
    y, normed, summed = rms_norm_linear_triton(x, residual, nw, 1e-6, w, keep_normed=keep_normed, config=cfg)
    if residual is None:
        want_normed, want_summed = rms_norm_triton(x, nw, 1e-6), x
    else:
        want_normed, want_summed = add_rms_norm_triton(x, residual, nw, 1e-6)
    assert torch.equal(summed, want_summed)
    assert (normed is None) == (not keep_normed)
    if keep_normed:
        assert torch.allclose(normed.float(), want_normed.float(), rtol=0, atol=2e-2 if dtype == torch.bfloat16 else 1e-5)
    assert rel_err(y, F.linear(want_normed.double(), w.double())) <= TOL[dtype]
    assert torch.equal(x, x0) and (residual is None or torch.equal(residual, r0))


def test_rms_norm_linear_is_the_norm_then_the_projection_on_the_cpu():
    """The CPU path (and any shape the fused kernel does not take) runs the norm, then `linear`: the same bits as
    the decoder's layers before the fusion."""
    x, r, nw, w = torch.randn(3, 16), torch.randn(3, 16), torch.rand(16), torch.randn(8, 16)
    y, normed, summed = ops.rms_norm_linear(x, r, nw, 1e-6, w, keep_normed=True)
    want_normed, want_summed = ops.add_rms_norm(x, r, nw, 1e-6)
    assert torch.equal(summed, want_summed) and torch.equal(normed, want_normed)
    assert torch.equal(y, F.linear(want_normed, w))
    y, normed, summed = ops.rms_norm_linear(x, None, nw, 1e-6, w)
    assert normed is None and summed is x and torch.equal(y, F.linear(ops.rms_norm(x, nw, 1e-6), w))


@needs_kernels
@pytest.mark.parametrize("cfg_name", ["picked", "ragged", "split"])
def test_weight_prefetch_gives_the_same_bits(cfg_name):
    """The one-row path with its first weight tile loaded before the PDL wait (what PDL launches run) sums in the
    same order as without: the same bits, with and without the fused norm."""
    from eep_hpc.kernels.triton_linear import LinearConfig, RowNorm, skinny_linear_triton

    cfg = {"picked": None, "ragged": LinearConfig(1, 4, 32, 1, 4, 1), "split": LinearConfig(1, 8, 32, 4, 4, 1)}[cfg_name]
    torch.manual_seed(1)
    K, N = 100 if cfg_name == "ragged" else 256, 40
    x, r = torch.randn(1, K, device=DEVICE), torch.randn(1, K, device=DEVICE)
    w, nw = torch.randn(N, K, device=DEVICE) * K**-0.5, 1 + 0.1 * torch.randn(K, device=DEVICE)
    for norm_of in (lambda: None, lambda: RowNorm(nw, 1e-6, r, torch.empty_like(x), torch.empty_like(x))):
        norms = [norm_of(), norm_of()]
        apart = skinny_linear_triton(x, w, config=cfg, norm=norms[0])
        prefetched = skinny_linear_triton(x, w, config=cfg, norm=norms[1], prefetch=True)
        assert torch.equal(apart, prefetched)
        if norms[0] is not None:
            assert torch.equal(norms[0].summed, norms[1].summed) and torch.equal(norms[0].normed, norms[1].normed)
