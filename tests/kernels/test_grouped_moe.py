"""The prefill MoE path through torch's grouped GEMM against the reference experts: packed and top-k fanout
layouts, padding pairs, slots nobody picks, fp8 experts (dequantised first). Runs on the CPU (torch's own
grouped GEMM) and on a CUDA GPU, where the kernels choose it for prefill-sized batches."""

from __future__ import annotations

import pytest
import torch

from eep_hpc.kernels.fp8 import BlockScales, quantize_blockwise, quantize_w13
from eep_hpc.kernels.grouped_moe import swiglu_experts_grouped
from eep_hpc.kernels.moe import swiglu_experts_reference
from kernel_checks import DEVICE, needs_kernels, rel_err


def case(R: int, fanout: int, S: int, D: int = 64, I: int = 48, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, D, generator=g).to(torch.bfloat16)
    slot = torch.randint(0, S, (R * fanout,), generator=g)
    slot[::7] = -1  # padding pairs
    slot[slot == S - 1] = 0  # the last slot gets no rows
    w13 = (torch.randn(S, 2 * I, D, generator=g) * D**-0.5).to(torch.bfloat16)
    w2 = (torch.randn(S, D, I, generator=g) * I**-0.5).to(torch.bfloat16)
    return [t.to(DEVICE) for t in (x, slot, w13, w2)]


@pytest.mark.parametrize("R,fanout,S", [(40, 1, 6), (33, 4, 8), (1, 8, 16), (300, 8, 32)])
def test_grouped_experts_match_reference(R, fanout, S):
    x, slot, w13, w2 = case(R, fanout, S)
    got = swiglu_experts_grouped(x, slot, w13, w2)
    want = swiglu_experts_reference(x.double(), slot, w13.double(), w2.double())
    real = slot >= 0
    assert rel_err(got[real], want[real]) < 1e-2  # bf16 products, fp32 accumulation


def test_grouped_fp8_experts_match_dequantised_reference():
    x, slot, w13, w2 = case(48, 4, 8, D=256, I=128)
    block = (128, 128)
    (q13, s13), (q2, s2) = quantize_w13(w13.float(), block), quantize_blockwise(w2.float(), block)
    scales = BlockScales(s13, s2, block)
    got = swiglu_experts_grouped(x, slot, q13, q2, scales=scales)
    want = swiglu_experts_reference(x.double(), slot, q13, q2, BlockScales(s13.double(), s2.double(), block))
    real = slot >= 0
    assert rel_err(got[real], want[real]) < 1e-2


@needs_kernels
def test_grouped_experts_summed_in_place_equal_the_sum_in_pair_order():
    """The prefill combine reads the grouped GEMM's outputs in slot order through the inverse permutation: the same
    bits as copying them back to pair order and summing there."""
    from eep_hpc.kernels.grouped_moe import swiglu_experts_grouped_combined
    from eep_hpc.kernels.triton_combine import weighted_sum_triton

    x, slot, w13, w2 = case(300, 8, 32)
    slot = slot.clamp_min(0)  # every pair real (a padding pair's output is undefined on both paths)
    weights = torch.rand(300, 8, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(DEVICE)
    got = swiglu_experts_grouped_combined(x, slot, weights, w13, w2)
    want = weighted_sum_triton(swiglu_experts_grouped(x, slot, w13, w2).view(300, 8, -1), weights)
    assert torch.equal(got, want)
