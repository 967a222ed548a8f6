"""Expert computation over local physical slots: torch reference (CPU, tests).

Rows arrive already dispatched: row m of x goes through the expert held in local slot `slot[m]`.
SwiGLU experts stacked per slot: w13 [S, 2I, D] (gate rows then up rows), w2 [S, D, I]; fp8 experts come with
their block scales (`fp8.BlockScales`) and are dequantised slot by slot, in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eep_hpc.kernels.fp8 import BlockScales, dequantize_blockwise, dequantize_w13


def swiglu_experts_reference(x: torch.Tensor, slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                             scales: BlockScales | None = None) -> torch.Tensor:
    """x [R, D], slot [M] (M = R * fanout: pair m reads row m // fanout) -> [M, D] (unweighted expert outputs).
    Pairs whose slot is negative are padding: their rows are zero."""
    if x.shape[0] and slot.shape[0] != x.shape[0]:
        x = x.repeat_interleave(slot.shape[0] // x.shape[0], dim=0)
    out = x.new_zeros(slot.shape[0], x.shape[1])
    if x.shape[0] == 0:
        return out
    padding = int((slot < 0).sum())
    order = torch.argsort(slot, stable=True)[padding:]  # padding sorts first
    counts = torch.bincount(slot[slot >= 0], minlength=w13.shape[0]).tolist()
    start = 0
    for s, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        a, b = w13[s], w2[s]
        if scales is not None:
            a = dequantize_w13(a, scales.w13[s], scales.block, x.dtype)
            b = dequantize_blockwise(b, scales.w2[s], scales.block, x.dtype)
        gate, up = (x[rows] @ a.t()).chunk(2, dim=-1)
        out[rows] = (F.silu(gate) * up) @ b.t()
    return out


def swiglu_experts_batched_reference(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                                     scales: BlockScales | None = None, rows_hint: int = 0) -> torch.Tensor:
    """x [E, N, D] with counts[e] rows of expert (local slot) e first in x[e] -> [E, N, D]; rows past the counts
    are zero. The layout nixl_ep's dispatch delivers and its combine reads."""
    E, N, D = x.shape
    out = x.new_zeros(E, N, D)
    for e, n in enumerate(counts.tolist()[: w13.shape[0]]):
        if n:
            out[e, :n] = swiglu_experts_reference(x[e, :n], torch.full((n,), e, dtype=torch.long), w13, w2, scales)
    return out
