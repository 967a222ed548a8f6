"""Skinny GEMM in Triton: y = x @ W.T (+ b) for a few token rows (decode), the GPU path of `F.linear` for M <= 16.

At decode the dense projections (qkv_proj, o_proj, the router gate, the LM head) read a whole weight matrix for one
to sixteen rows: pure weight streaming. cuBLAS picks GEMM tiles made for larger M there (at batch 1 on the H200:
~25 us per layer for ~38 MB, a floor of ~9 us, plus a split-K reduce launch). Here a program owns BLOCK_N output
columns (= weight rows, contiguous in K) and walks K in BLOCK_K steps; the grid has enough programs to keep every SM
streaming, and all of a program's loads of one step are independent 16-byte loads.

Two inner products, one kernel:
- BLOCK_M == 1 (one row, M = 1): no tensor cores; fp32 FMAs into a [BLOCK_N, BLOCK_K] accumulator, reduced over K
  once at the end (no shuffle per step).
- BLOCK_M == 16 (2 to 16 rows): tl.dot of the [BLOCK_M, BLOCK_K] row tile with the transposed weight tile (rows past
  M are masked to zero), so each weight byte is read once for all rows.
Split-K (SPLIT_K > 1, where N alone gives too few programs): each program covers K_SPLIT of K and writes an fp32
partial [SPLIT_K, M, N]; `_split_k_reduce` sums them in a fixed order (deterministic, no atomics, no zeroed buffer).
fp32 inputs use IEEE dots (tests); the accumulator is fp32 and rounded once to the output dtype, as cuBLAS does.

The config depends on (M, N, K, dtype) only and nothing syncs with the host: CUDA graphs capture it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from eep_hpc.kernels.pdl import pdl_args, pdl_start

MAX_M = 16  # rows the skinny path serves (ops.linear sends larger M to cuBLAS)


@dataclass(frozen=True)
class LinearConfig:
    BLOCK_M: int  # 1: FMA path (M must be 1); 16: tl.dot path
    BLOCK_N: int
    BLOCK_K: int
    SPLIT_K: int
    num_warps: int
    num_stages: int


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: small grids
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


def one_row_columns(N: int, sms: int, programs_per_column_block: int = 1) -> int:
    """Output columns per one-row program: the widest power of two <= 16 that still gives about two programs per SM
    (kernels/triton_moe_one_token.py too, whose column blocks each have a program per expert pair)."""
    block_n = 16
    while block_n > 1 and programs_per_column_block * triton.cdiv(N, block_n) < 2 * sms:
        block_n //= 2
    return block_n


def pick_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device) -> LinearConfig:
    """From shapes only. Aim: at least ~2 programs per SM (bytes in flight), weight tiles of 8-16 KB per K step,
    split-K only when the weight rows alone cannot give one program per SM.
    `python -m eep_hpc.bench.kernels --only linear --sweep` times the alternatives (H100/H200)."""
    sms = _num_sms(device)
    esize = dtype.itemsize
    if M == 1:
        block_n = one_row_columns(N, sms)
        # ~16 KB of weights per program and K step (fewer columns: longer rows), at most 4096 elements
        block_k = min(triton.next_power_of_2(K), max(16384 // esize // block_n, 128), 4096)
        split = 1
        while triton.cdiv(N, block_n) * split < sms and K // (split * 2) >= block_k and split < 16:
            split *= 2
        return LinearConfig(1, block_n, block_k, split, 4, 1)
    block_k = min(max(triton.next_power_of_2(K), 16), 256 if esize == 2 else 64)
    block_n = 32 if triton.cdiv(N, 32) >= 2 * sms else 16
    split = 1
    while triton.cdiv(N, block_n) * split < sms and K // (split * 2) >= block_k and split < 16:
        split *= 2
    return LinearConfig(16, block_n, block_k, split, 4, 3 if esize == 2 else 2)


@triton.jit
def _row_rstd(x_ptr, r_ptr, K, eps, HAS_RESIDUAL: tl.constexpr, BLOCK_D: tl.constexpr):
    """1 / rms of the one row x (+ r, rounded to x's dtype as torch's x + r), over all K: every program needs it."""
    cols = tl.arange(0, BLOCK_D)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)).to(x.dtype)
    x32 = x.to(tl.float32)
    return tl.rsqrt(tl.sum(x32 * x32, 0) / K + eps)


@triton.jit
def _normed_chunk(x, r_ptr, nw_ptr, sum_ptr, normed_ptr, k, k_ok, write_ok, rstd,
                  HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr):
    """x [1, BLOCK_K] (columns k of the row) -> its RMSNorm, rounded as `triton_norm` rounds (normalised value to
    x's dtype, then times the weight); the programs of the first column block also store the sum with
    the residual and, WRITE_NORMED, the normalised row, for the layers after this projection (write_ok: the
    columns k this program stores)."""
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + k[None, :], mask=k_ok[None, :], other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(sum_ptr + k[None, :], x, mask=write_ok[None, :])
    nw = tl.load(nw_ptr + k[None, :], mask=k_ok[None, :], other=0.0)
    y = ((x.to(tl.float32) * rstd).to(x.dtype).to(tl.float32) * nw.to(tl.float32)).to(x.dtype)
    if WRITE_NORMED:
        tl.store(normed_ptr + k[None, :], y, mask=write_ok[None, :])
    return y


@triton.jit(do_not_specialize=["M"])  # the row count: one compile for 2-16 rows, not one per divisibility class
def _skinny_linear_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, part_ptr, M, N, K, K_SPLIT,
    stride_xm, stride_wn, stride_om,
    r_ptr, nw_ptr, sum_ptr, normed_ptr, eps,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_NORMED: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr, PREFETCH: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn  # the LM head has ~3e8 weights
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    k_begin = pid_k * K_SPLIT
    k_end = tl.minimum(k_begin + K_SPLIT, K)
    if PREFETCH:  # the first weight tile does not depend on the kernel before: load it while that one finishes
        k = k_begin + offs_k
        w_first = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & (k < k_end)[None, :], other=0.0)
    pdl_start(USE_PDL)
    if BLOCK_M == 1:
        if NORM:
            rstd = _row_rstd(x_ptr, r_ptr, K, eps, HAS_RESIDUAL, BLOCK_D)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        k_first = k_begin
        if PREFETCH:
            k = k_begin + offs_k
            k_ok = k < k_end
            x = tl.load(x_rows + k[None, :], mask=k_ok[None, :], other=0.0)
            if NORM:
                x = _normed_chunk(x, r_ptr, nw_ptr, sum_ptr, normed_ptr, k, k_ok, k_ok & (k * 0 + pid_n == 0), rstd,
                                  HAS_RESIDUAL, WRITE_NORMED)
            acc2 += w_first.to(tl.float32) * x.to(tl.float32)
            k_first = k_begin + BLOCK_K
        for k0 in range(k_first, k_end, BLOCK_K):
            k = k0 + offs_k
            if EVEN_K:
                k_ok = k < K  # all true: folded away
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
                x = tl.load(x_rows + k[None, :])
            else:
                k_ok = k < k_end
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=k_ok[None, :], other=0.0)
            if NORM:
                x = _normed_chunk(x, r_ptr, nw_ptr, sum_ptr, normed_ptr, k, k_ok, k_ok & (k * 0 + pid_n == 0), rstd,
                                  HAS_RESIDUAL, WRITE_NORMED)
            acc2 += w.to(tl.float32) * x.to(tl.float32)
        acc = tl.reshape(tl.sum(acc2, 1), (1, BLOCK_N))
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_begin, k_end, BLOCK_K):
            k = k0 + offs_k
            if EVEN_K:
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=m_ok[:, None], other=0.0)
            else:
                k_ok = k < k_end
                w = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
                x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:  # partials [SPLIT_K, M, N] fp32
        part = part_ptr + (pid_k * M + offs_m).to(tl.int64)[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=ok)


@triton.jit(do_not_specialize=["M"])
def _split_k_reduce(
    part_ptr, b_ptr, out_ptr, M, N, stride_om,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: the same sums on every run
        acc += tl.load(part_ptr + (s * M + m).to(tl.int64) * N + offs, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@dataclass(frozen=True)
class RowNorm:
    """The RMSNorm a one-row projection applies to its input first (`rms_norm_linear_triton`): the row x is first
    summed with `residual` (when given), then normalised with `weight`; `summed` and `normed` receive the sum and
    the normalised row (normed: None when nobody reads it)."""
    weight: torch.Tensor
    eps: float
    residual: torch.Tensor | None
    summed: torch.Tensor
    normed: torch.Tensor | None


def weight_prefetch_enabled() -> bool:
    """With PDL, a one-row program loads its first weight tile before it waits for the kernel before it (weights
    never depend on it), so the projection's weight streaming starts while the attention or the MoE before it
    ends. `EEP_HPC_PDL_PREFETCH=0` waits first (read at each launch)."""
    return os.environ.get("EEP_HPC_PDL_PREFETCH", "1") != "0"


def skinny_linear_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                         config: LinearConfig | None = None, out: torch.Tensor | None = None,
                         norm: RowNorm | None = None, prefetch: bool = False) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias [N]) -> [..., N] in x's dtype, for at most MAX_M rows (BLOCK_M 16) or
    one row (BLOCK_M 1). norm (one row only): the projection of the row's RMSNorm (see RowNorm). prefetch: the
    one-row path's first weight tile loaded before the PDL wait even without PDL (tests: the same result)."""
    K = x.shape[-1]
    N = weight.shape[0]
    assert weight.shape == (N, K) and weight.stride(-1) == 1 and weight.dtype == x.dtype, (x.shape, weight.shape)
    assert bias is None or (bias.shape == (N,) and bias.is_contiguous())
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    out2 = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out.view(M, N)
    if M == 0 or N == 0:
        return out2.view(*x.shape[:-1], N)
    if K == 0:
        out2.copy_(bias.expand(M, N) if bias is not None else torch.zeros(M, N, dtype=x.dtype, device=x.device))
        return out2.view(*x.shape[:-1], N)
    cfg = config or pick_config(M, N, K, x.dtype, x.device)
    assert M <= MAX_M and (cfg.BLOCK_M >= 16 or M == 1), (M, cfg)
    if norm is not None:
        assert M == 1 and cfg.BLOCK_M == 1 and norm.weight.shape == (K,) and norm.weight.dtype == x.dtype, (M, cfg)
        for t in (norm.residual, norm.summed, norm.normed):
            assert t is None or (t.numel() == K and t.dtype == x.dtype and t.is_contiguous())
    split = cfg.SPLIT_K
    k_split = triton.cdiv(triton.cdiv(K, split), cfg.BLOCK_K) * cfg.BLOCK_K  # whole K tiles per split
    split = triton.cdiv(K, k_split)  # splits that own any K
    even_k = K % cfg.BLOCK_K == 0  # then every split's range is whole tiles too
    part = (torch.empty(split, M, N, dtype=torch.float32, device=x.device) if split > 1 else out2)
    grid = (triton.cdiv(N, cfg.BLOCK_N), split, triton.cdiv(M, cfg.BLOCK_M))
    unused = weight  # stands in for pointers a variant never reads
    launch = pdl_args(x2)
    _skinny_linear_kernel[grid](
        x2, weight, bias if bias is not None else unused, out2, part, M, N, K, k_split,
        x2.stride(0), weight.stride(0), out2.stride(0),
        *((norm.residual if norm.residual is not None else unused, norm.weight, norm.summed,
           norm.normed if norm.normed is not None else unused, norm.eps) if norm else (unused,) * 4 + (0.0,)),
        HAS_BIAS=bias is not None and split == 1, BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K,
        SPLIT_K=split, EVEN_K=even_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        NORM=norm is not None, HAS_RESIDUAL=norm is not None and norm.residual is not None,
        WRITE_NORMED=norm is not None and norm.normed is not None,
        BLOCK_D=triton.next_power_of_2(K) if norm else 1,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch,
        PREFETCH=cfg.BLOCK_M == 1 and (launch["USE_PDL"] or prefetch) and weight_prefetch_enabled(),
    )
    if split > 1:
        block = min(1024, triton.next_power_of_2(N))
        _split_k_reduce[(triton.cdiv(N, block), M)](
            part, bias if bias is not None else weight, out2, M, N, out2.stride(0),
            HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block, num_warps=4, **pdl_args(out2),
        )
    return out2.view(*x.shape[:-1], N)


# the widest row whose norm one program recomputes in registers (the hidden sizes of the models served: 2-7k)
ROW_NORM_MAX_K = 8192


def rms_norm_linear_triton(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                           weight: torch.Tensor, keep_normed: bool = False, config: LinearConfig | None = None):
    """One row x [1, K] (+ residual [1, K]) -> (y [1, N], normed [1, K] or None, summed [1, K]): summed = x +
    residual (x itself without one), normed = RMSNorm(summed), y = normed @ weight.T, in one launch (the norm
    kernel's launch before a batch-1 projection was ~2 us of a ~75 us layer). Every program recomputes the row's
    norm (K elements from L2); the first column block's programs write summed and normed."""
    assert x.shape[0] == 1 and x.dim() == 2 and x.shape[1] <= ROW_NORM_MAX_K, x.shape
    summed = torch.empty_like(x) if residual is not None else x
    normed = torch.empty_like(x) if keep_normed else None
    norm = RowNorm(norm_weight, eps, residual, summed, normed)
    return skinny_linear_triton(x, weight, config=config, norm=norm), normed, summed


