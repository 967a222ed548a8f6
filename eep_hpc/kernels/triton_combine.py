"""Two memory-bound steps around the experts at prefill sizes, one pass each (torch takes two, or a batched matmul
with k = 8 that cuBLAS runs at about a third of the copy rate: 271 us a layer at 8,192 tokens on an H100):

- `silu_mul_triton`: SiLU(gate) * up of the grouped GEMM's [M, 2I] output -> [M, I] (torch: two kernels).
- `weighted_sum_triton`: the combine's sum of each token's k expert outputs, weighted, fp32 accumulation in pair
  order (deterministic) -> [T, D]; the outputs read in pair order, or through a row index where they lie (the
  grouped GEMM's slot order: no copy back to pair order first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eep_hpc.kernels.pdl import pdl_args, pdl_start


@triton.jit(do_not_specialize=["M"])
def _silu_mul_kernel(x_ptr, out_ptr, M, I, stride_x, stride_o, BLOCK_M: tl.constexpr, BLOCK_I: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = (rows[:, None] < M) & (cols[None, :] < I)
    gate = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + rows[:, None] * stride_x + I + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    y = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + rows[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [M, 2I] (gate columns first) -> SiLU(gate) * up [M, I]."""
    M, I2 = gate_up.shape
    I = I2 // 2
    assert gate_up.stride(1) == 1 and I2 == 2 * I
    out = gate_up.new_empty(M, I)
    if M:
        BLOCK_M, BLOCK_I = 16, min(256, triton.next_power_of_2(I))
        _silu_mul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(I, BLOCK_I))](
            gate_up, out, M, I, gate_up.stride(0), out.stride(0), BLOCK_M=BLOCK_M, BLOCK_I=BLOCK_I, num_warps=4,
            **pdl_args(out))
    return out


@triton.jit(do_not_specialize=["T"])
def _weighted_sum_kernel(p_ptr, w_ptr, idx_ptr, out_ptr, T, D, stride_pt, stride_pk, stride_wt, stride_o,
                         K: tl.constexpr, BLOCK_D: tl.constexpr, GATHER: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    ok = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for j in tl.static_range(K):  # pair order: the same sum on every run
        w = tl.load(w_ptr + t * stride_wt + j).to(tl.float32)
        if GATHER:  # pair (t, j) is row idx[t, j] of p [N, D]
            row = tl.load(idx_ptr + t * K + j).to(tl.int64) * stride_pt
        else:  # p [T, K, D]
            row = t * stride_pt + j * stride_pk
        acc += w * tl.load(p_ptr + row + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_o + cols, acc.to(out_ptr.dtype.element_ty), mask=ok)


def weighted_sum_triton(pairs: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """pairs [T, k, D], weights [T, k] -> [T, D] in pairs' dtype. rows [T, k]: pairs is [N, D] instead, and pair
    (t, j) is its row rows[t, j] (read in place, e.g. the grouped GEMM's slot order)."""
    T, K = weights.shape
    D = pairs.shape[-1]
    assert weights.stride(1) == 1 and pairs.stride(-1) == 1
    if rows is None:
        assert pairs.shape == (T, K, D)
        stride_pt, stride_pk = pairs.stride(0), pairs.stride(1)
    else:
        assert pairs.dim() == 2 and rows.shape == (T, K) and rows.is_contiguous()
        stride_pt, stride_pk = pairs.stride(0), 0
    out = pairs.new_empty(T, D)
    if T:
        BLOCK_D = min(1024, triton.next_power_of_2(D))
        _weighted_sum_kernel[(T, triton.cdiv(D, BLOCK_D))](
            pairs, weights, rows if rows is not None else weights, out, T, D, stride_pt, stride_pk,
            weights.stride(0), out.stride(0), K=K, BLOCK_D=BLOCK_D, GATHER=rows is not None, num_warps=4,
            **pdl_args(out))
    return out
