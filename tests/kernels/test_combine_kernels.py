"""The two one-pass kernels around the prefill experts (kernels/triton_combine.py) against float64: SiLU(gate) * up
of the grouped GEMM's output, and the combine's weighted sum of each token's k expert outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kernel_checks import DEVICE, DTYPES, TOL, needs_kernels, rel_err


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("M,I", [(1, 8), (37, 48), (130, 300)])
def test_silu_mul(M, I, dtype):
    from eep_hpc.kernels.triton_combine import silu_mul_triton

    g = torch.Generator().manual_seed(M + I)
    gate_up = (torch.randn(M, 2 * I, generator=g) * 3).to(dtype).to(DEVICE)
    got = silu_mul_triton(gate_up)
    x = gate_up.double()
    want = F.silu(x[:, :I]) * x[:, I:]
    assert got.shape == (M, I) and got.dtype == dtype and rel_err(got, want) <= TOL[dtype]


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,k,D", [(1, 8, 64), (29, 8, 200), (5, 3, 2048)])
def test_weighted_sum(T, k, D, dtype):
    from eep_hpc.kernels.triton_combine import weighted_sum_triton

    g = torch.Generator().manual_seed(T * k + D)
    pairs = torch.randn(T, k, D, generator=g).to(dtype).to(DEVICE)
    weights = torch.rand(T, k, generator=g).to(dtype).to(DEVICE)
    got = weighted_sum_triton(pairs, weights)
    want = (pairs.double() * weights.double()[..., None]).sum(1)
    assert got.shape == (T, D) and rel_err(got, want) <= TOL[dtype]
    assert torch.equal(weighted_sum_triton(pairs, weights), got)  # the same order every run


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_weighted_sum_reads_pairs_through_a_row_index(dtype):
    """Pairs read where they lie (rows[t, j] of an [N, D] block, e.g. the grouped GEMM's slot order): the same
    bits as the sum over those rows gathered into pair order first."""
    from eep_hpc.kernels.triton_combine import weighted_sum_triton

    T, k, D = 23, 8, 200
    g = torch.Generator().manual_seed(5)
    block = torch.randn(T * k + 9, D, generator=g).to(dtype).to(DEVICE)  # more rows than pairs: some never read
    rows = torch.randperm(T * k + 9, generator=g)[: T * k].view(T, k).to(DEVICE)
    weights = torch.rand(T, k, generator=g).to(dtype).to(DEVICE)
    got = weighted_sum_triton(block, weights, rows)
    assert torch.equal(got, weighted_sum_triton(block[rows.reshape(-1)].view(T, k, D), weights))
    want = (block.double()[rows] * weights.double()[..., None]).sum(1)
    assert rel_err(got, want) <= TOL[dtype]
