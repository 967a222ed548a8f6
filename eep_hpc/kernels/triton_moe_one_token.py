"""One token's experts and their weighted sum as weight streaming: two kernels for a batch-1 decode step on one rank.

At batch 1 a MoE layer is one row through k experts (k distinct slots): it reads k x 3 x I x D weights for one
row of arithmetic, like the dense projections (`triton_linear.py`'s one-row path, which streams the LM head at the
copy rate). The grouped GEMMs of `triton_moe.py` run it as k row blocks of 16 rows with one live row each, and the
combine's weighted sum is a third launch. Here:

1. `_w13_kernel`, a program per (BLOCK_N columns of I, pair): h[j] = silu(x @ gate[s_j].T) * (x @ up[s_j].T), fp32
   FMAs into [BLOCK_N, BLOCK_K] accumulators, reduced once at the end; h rounded to x's dtype (as the grouped GEMM
   stores it).
2. `_w2_sum_kernel`, a program per BLOCK_N columns of D: out = sum_j w_j * (h[j] @ w2[s_j].T), the k pairs in
   order inside the program, so the combine needs no launch of its own and no bf16 rounding of each pair's output.
   The sum's order is fixed (pairs in order, then the accumulator's columns): the same result on every run.

Pairs whose slot is outside [0, S) (padding of a graph batch, an idle rank's zero rows) add nothing. The loops over K
and over the pairs are unrolled (trip counts from the shapes), so the loads of later steps can be issued before the
arithmetic of earlier ones: a program keeps several weight tiles in flight, which one row of arithmetic cannot hide.
`ops.swiglu_experts_combined` picks this path; `EEP_HPC_MOE_ONE_TOKEN=0` keeps the grouped GEMMs and the weighted-sum
kernel (before/after in one process). H100, batch-1 step: w2 and the sum 668 -> 574 us, w13 as fast as the grouped
GEMM (969 -> 974 us): the step 3.42 -> 3.23 ms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from eep_hpc.kernels.pdl import pdl_args, pdl_start
from eep_hpc.kernels.triton_linear import _num_sms, one_row_columns

MAX_PAIRS = 16  # one token's top-k (Qwen3/DeepSeek-style routers: 8)


@dataclass(frozen=True)
class OneTokenConfig:
    BLOCK_N13: int  # columns of I per w13 program
    BLOCK_K13: int  # of D per step
    BLOCK_N2: int  # columns of D per w2 program
    BLOCK_K2: int  # of I per step
    num_warps: int = 4


def pick_config(pairs: int, D: int, I: int, dtype: torch.dtype, device: torch.device) -> OneTokenConfig:
    """From shapes only (a captured graph stays valid). About 16 KB of weights per program and K step (w13 reads
    a gate and an up tile per step), as the one-row skinny GEMM."""
    sms, esize = _num_sms(device), dtype.itemsize
    bn13 = one_row_columns(I, sms, programs_per_column_block=pairs)
    bk13 = min(triton.next_power_of_2(D), max(8192 // esize // bn13, 64), 2048)
    bn2 = one_row_columns(D, sms)
    bk2 = min(triton.next_power_of_2(I), max(16384 // esize // bn2, 64), 4096)
    return OneTokenConfig(bn13, bk13, bn2, bk2)


@triton.jit
def _w13_kernel(
    x_ptr, w13_ptr, h_ptr, slot_ptr, D, I, S, stride_we, stride_wn, stride_hm,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    pid_n = tl.program_id(0)
    j = tl.program_id(1)
    s = tl.load(slot_ptr + j).to(tl.int64)
    if (s < 0) | (s >= S):  # padding: w2 skips this pair too
        return
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    gate_rows = w13_ptr + s * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn  # w13[s] is [2I, D]
    up_rows = gate_rows + I * stride_wn
    acc_g = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for step in tl.static_range(K_STEPS):
        k = step * BLOCK_K + offs_k
        k_ok = k < D
        x = tl.load(x_ptr + k, mask=k_ok, other=0.0).to(tl.float32)[None, :]
        g = tl.load(gate_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        u = tl.load(up_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        acc_g += g.to(tl.float32) * x
        acc_u += u.to(tl.float32) * x
    gate = tl.sum(acc_g, 1)
    h = gate / (1.0 + tl.exp(-gate)) * tl.sum(acc_u, 1)
    tl.store(h_ptr + j * stride_hm + offs_n, h.to(h_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _w2_sum_kernel(
    h_ptr, w2_ptr, weight_ptr, out_ptr, slot_ptr, D, I, S, stride_we, stride_wn, stride_hm,
    PAIRS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_STEPS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for j in tl.static_range(PAIRS):  # pair order: the same sum on every run
        s = tl.load(slot_ptr + j).to(tl.int64)
        ok = (s >= 0) & (s < S)
        k_end = tl.where(ok, I, 0)  # padding pairs read nothing and add nothing
        w_j = tl.load(weight_ptr + j).to(tl.float32)
        rows = w2_ptr + tl.where(ok, s, 0) * stride_we + offs_n.to(tl.int64)[:, None] * stride_wn  # w2[s]: [D, I]
        for step in tl.static_range(K_STEPS):
            k = step * BLOCK_K + offs_k
            k_ok = k < k_end
            h = tl.load(h_ptr + j * stride_hm + k, mask=k_ok, other=0.0).to(tl.float32) * w_j
            b = tl.load(rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
            acc += b.to(tl.float32) * h[None, :]
    tl.store(out_ptr + offs_n, tl.sum(acc, 1).to(out_ptr.dtype.element_ty), mask=n_ok)


def one_token_experts_triton(x: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                             w2: torch.Tensor, config: OneTokenConfig | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """x [1, D], slot [k] (local slots; outside [0, S): skipped), weights [k] or [1, k] -> [1, D] =
    sum_j weights[j] * expert_{slot[j]}(x), with SwiGLU experts w13 [S, 2I, D], w2 [S, D, I] in x's dtype."""
    D = x.shape[-1]
    P = slot.numel()
    S, two_i, _ = w13.shape
    I = two_i // 2
    assert x.numel() == D and 0 < P <= MAX_PAIRS and weights.numel() == P, (x.shape, slot.shape, weights.shape)
    assert w13.shape == (S, 2 * I, D) and w2.shape == (S, D, I) and x.dtype == w13.dtype == w2.dtype
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1
    x = x.reshape(D) if x.is_contiguous() else x.reshape(D).contiguous()
    slot, weights = slot.reshape(P).contiguous(), weights.reshape(P).contiguous()
    out = x.new_empty(1, D) if out is None else out
    assert out.shape == (1, D) and out.dtype == x.dtype and out.is_contiguous()
    cfg = config or pick_config(P, D, I, x.dtype, x.device)
    h = x.new_empty(P, I)
    launch = pdl_args(x)
    _w13_kernel[(triton.cdiv(I, cfg.BLOCK_N13), P)](
        x, w13, h, slot, D, I, S, w13.stride(0), w13.stride(1), h.stride(0),
        BLOCK_N=cfg.BLOCK_N13, BLOCK_K=cfg.BLOCK_K13, K_STEPS=triton.cdiv(D, cfg.BLOCK_K13),
        num_warps=cfg.num_warps, num_stages=1, **launch,
    )
    _w2_sum_kernel[(triton.cdiv(D, cfg.BLOCK_N2),)](
        h, w2, weights, out, slot, D, I, S, w2.stride(0), w2.stride(1), h.stride(0),
        PAIRS=P, BLOCK_N=cfg.BLOCK_N2, BLOCK_K=cfg.BLOCK_K2, K_STEPS=triton.cdiv(I, cfg.BLOCK_K2),
        num_warps=cfg.num_warps, num_stages=1, **launch,
    )
    return out
