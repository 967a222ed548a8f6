"""Prefill-sized SwiGLU experts through torch's grouped GEMM (`torch._grouped_mm`: CUTLASS grouped GEMMs on
Hopper), the GPU path of `moe.swiglu_experts_reference` when many rows reach each slot.

The Triton kernels (triton_moe.py) stream weights well at decode sizes but reach about a quarter of the tensor
cores' rate at prefill sizes (H100, 65,536 pairs: 2.8 ms for 618 GFLOP). Here the pairs are sorted by slot (padding
pairs last), gathered into one [M, D] block, and each slot's rows go through two grouped GEMMs with the slot
offsets on the device: no host sync, but data-dependent shapes inside, so it is for eager steps only (decode graphs
keep the Triton path). fp8 experts are dequantised to x's dtype first, layer by layer (the grouped GEMM takes no
block scales).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eep_hpc.kernels.fp8 import BlockScales, dequantize_blockwise, dequantize_w13


def grouped_mm_available(x: torch.Tensor) -> bool:
    """bf16 on a Hopper (or newer) GPU, where torch's grouped GEMM runs."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def swiglu_experts_grouped(x: torch.Tensor, slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                           scales: BlockScales | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [R, D], slot [M] (pair m reads row m // (M / R)) -> [M, D] unweighted expert outputs; pairs whose slot is
    outside [0, S) are padding and their rows are left unwritten (the Triton path's contract)."""
    M, D = slot.shape[0], x.shape[1]
    out = x.new_empty(M, D) if out is None else out
    if M == 0:
        return out
    y, inverse = _grouped_sorted(x, slot, w13, w2, scales)
    # back to pair order by a gather through the inverse permutation (index_copy_, the scatter, ran at a third of
    # the gather's rate: 430 us a layer at 8,192 tokens on an H100)
    return torch.index_select(y, 0, inverse, out=out)


def swiglu_experts_grouped_combined(x: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                                    w2: torch.Tensor, scales: BlockScales | None = None) -> torch.Tensor:
    """x [T, D], slot [T * k] (pair m: token m // k), weights [T, k] -> [T, D]: each token's k expert outputs,
    weighted and summed, read from the GEMM's slot order through the inverse permutation in the sum's one pass
    (no [T * k, D] copy back to pair order in between: a write and a read of 268 MB a layer at 8,192 tokens)."""
    from eep_hpc.kernels.triton_combine import weighted_sum_triton

    T, k = weights.shape
    if T == 0:
        return x.new_empty(0, x.shape[1])
    y, inverse = _grouped_sorted(x, slot, w13, w2, scales)
    return weighted_sum_triton(y, weights.contiguous(), inverse.view(T, k))


def _grouped_sorted(x, slot, w13, w2, scales):
    """-> (y [M, D]: the pairs' expert outputs sorted by slot, padding last and unwritten; inverse [M]: the row of
    y that holds pair m)."""
    R = x.shape[0]
    M = slot.shape[0]
    S = w13.shape[0]
    fanout = M // R
    if scales is not None:
        w13 = dequantize_w13(w13, scales.w13, scales.block, x.dtype)
        w2 = dequantize_blockwise(w2, scales.w2, scales.block, x.dtype)
    s = slot.to(torch.int64)
    key = torch.where((s >= 0) & (s < S), s, S)  # padding sorts after every slot
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(S + 1, dtype=torch.int32, device=x.device).scatter_add_(
        0, key, torch.ones_like(key, dtype=torch.int32))  # not bincount: it reads the maximum back to the host
    offs = torch.cumsum(counts[:S], 0, dtype=torch.int32)
    rows = x.index_select(0, order // fanout if fanout > 1 else order)
    gate_up = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs)  # [M, 2I]; rows past offs[-1] undefined
    y = torch._grouped_mm(_silu_mul(gate_up), w2.transpose(1, 2), offs=offs)  # [M, D]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(M, device=order.device)
    return y, inverse


def _silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up of [M, 2I] (gate columns first): one Triton pass on the GPU, two torch ops elsewhere."""
    if gate_up.is_cuda:
        from eep_hpc.kernels.triton_combine import silu_mul_triton

        return silu_mul_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
