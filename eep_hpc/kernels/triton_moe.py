"""Fused SwiGLU experts over local slots in Triton (the GPU path of `moe.swiglu_experts_reference`).

Pairs arrive already dispatched (pair m goes through local slot `slot[m]`), so there is no weighted sum here: each
pair is computed exactly once and written back to its own place. Its input row is x[m // FANOUT]: FANOUT = 1 after
an exchange, top_k on one rank, where a token's k pairs read its row in place of k copies.

1. `align_rows_by_slot` (one single-program kernel, no host sync): sort rows by slot and pad each slot's group to a
   multiple of BLOCK_M, so that every BLOCK_M-row block of the sorted order belongs to one slot (like vLLM's
   moe_align_block_size). Padding entries hold the sentinel M.
2. `_w13_silu_kernel`: grouped GEMM h[p] = silu(x[r] @ w13[s, :I].T) * (x[r] @ w13[s, I:].T) for each padded
   position p (row r = sorted_rows[p], slot s = block_slot[p // BLOCK_M]); gate and up tiles share the A tile and
   the activation happens in registers, so [M, 2I] never reaches memory. h is [EM, I] in padded order.
3. `_w2_kernel`: grouped GEMM out[r] = h[p] @ w2[s].T, stored straight to the row's original place.

One token (a batch-1 decode step on one rank): its k pairs have k distinct slots, so step 1 is skipped and pair m is
row block m of its own (PAIR_BLOCKS); the sort cost a single-program launch per layer (4.4 us of ~75 us per layer
at batch 1 on the H100). `EEP_HPC_MOE_PAIR_BLOCKS=0` sorts always (the before of a before/after).

FP8 experts (HAS_SCALES): w13/w2 are float8_e4m3fn with block scales (see `fp8.py`), activations stay in x's
dtype (weight-only W8A16). Each fp8 weight tile is widened to x's dtype in registers (exact: e4m3 fits in bf16),
its dot is taken in fp32 and multiplied by the tile's per-column scales before it joins the accumulator. A K tile
never straddles a scale block (BLOCK_K divides bk), so one scale per output column covers it.

Shapes: M rows, D hidden, I expert intermediate, S local slots, EM = padded rows (a bound known from M and S alone,
so buffers and grids depend on shapes only; CUDA graphs can capture a fixed M).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from eep_hpc.kernels.fp8 import FP8, BlockScales, expert_scale_shapes
from eep_hpc.kernels.pdl import pdl_args, pdl_start


# the most pairs of one token that go through the experts unsorted (PAIR_BLOCKS): top-k of Qwen3/DeepSeek-style
# routers is 8; a larger k with few experts would hold duplicate slots only across tokens, never within one
PAIR_BLOCKS_MAX_PAIRS = 16


def pair_blocks_enabled() -> bool:
    """Read at each call, so a benchmark can compare in one process (`EEP_HPC_MOE_PAIR_BLOCKS=0`: always sort)."""
    return os.environ.get("EEP_HPC_MOE_PAIR_BLOCKS", "1") != "0"


@dataclass(frozen=True)
class MoEConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    num_warps: int
    num_stages: int


def pick_config(M: int, S: int, D: int, I: int, dtype: torch.dtype = torch.bfloat16, fp8: bool = False) -> MoEConfig:
    """Tile shapes by rows per slot (H100; tiny shapes get the smallest tiles that tl.dot accepts). fp32 tiles
    take twice the shared memory per stage: half the K tile and at most 3 stages. fp8: the weights are fp8
    (python -m eep_hpc.bench.kernels --sweep picks these)."""
    if max(D, I) <= 128:
        return MoEConfig(16, 32, 32, 1, 4, 2)
    rows_per_slot = M / max(S, 1)
    if rows_per_slot <= 4:  # decode: weight streaming, few rows per slot
        # a handful of slots hit (batch 1: top_k of them) gives too few 64-column programs to keep every SM
        # streaming: halve the tile
        cfg = MoEConfig(16, 32 if min(M, S) * triton.cdiv(I, 64) < 256 else 64, 128, 1, 4, 4)
    elif rows_per_slot <= 32:
        cfg = MoEConfig(32, 64, 128, 4, 4, 4)
    elif fp8:  # fp8 tiles widened in registers beside two accumulators: 64-row tiles, 4 warps (H100, 128 slots:
        cfg = MoEConfig(64, 128, 64, 8, 4, 4)  # M = 16,384: 1.43 -> 1.25 ms; M = 65,536: 5.71 -> 4.22 ms)
    elif rows_per_slot <= 128:
        cfg = MoEConfig(64, 128, 64, 8, 8, 4)
    else:
        cfg = MoEConfig(128, 128, 64, 8, 8, 3)
    if dtype == torch.float32:
        cfg = MoEConfig(cfg.BLOCK_M, cfg.BLOCK_N, max(32, cfg.BLOCK_K // 2), cfg.GROUP_M, cfg.num_warps,
                        min(3, cfg.num_stages))
    return cfg


def _padded_rows(M: int, S: int, block_m: int) -> int:
    em = M + min(M, S) * (block_m - 1)
    return (em + block_m - 1) // block_m * block_m


def align_rows_by_slot_torch(slot: torch.Tensor, S: int, block_m: int):
    """Reference for `align_rows_by_slot` in torch ops (stable order within a slot)."""
    M = slot.shape[0]
    dev = slot.device
    em = _padded_rows(M, S, block_m)
    slot = slot.to(torch.int64)
    counts = torch.zeros(S, dtype=torch.int64, device=dev).scatter_add_(0, slot, torch.ones_like(slot))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)  # [S]
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(slot, stable=True)  # [M] rows grouped by slot
    sorted_slot = slot[order]
    dest = padded_start[sorted_slot] + torch.arange(M, device=dev) - start[sorted_slot]
    sorted_rows = torch.full((em,), M, dtype=torch.int32, device=dev)
    sorted_rows[dest] = order.to(torch.int32)
    block_begin = torch.arange(0, em, block_m, device=dev)
    block_slot = torch.searchsorted(padded_end, block_begin, right=True)
    total = padded_end[-1:]
    block_slot = torch.where(block_begin < total, block_slot, -1).to(torch.int32)
    return sorted_rows, block_slot, total.to(torch.int32)


@triton.jit(do_not_specialize=["M", "EM", "NUM_BLOCKS"])  # batch-dependent ints: no recompiles
def _align_kernel(
    slot_ptr, sorted_rows_ptr, block_slot_ptr, num_padded_ptr, cursor_ptr, M, S, EM, NUM_BLOCKS,
    BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, CHUNK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program: count rows per slot, pad to BLOCK_M, write each block's slot, then scatter row ids to
    their padded positions (atomic cursors: the order within a slot is arbitrary, which changes no result)."""
    pdl_start(USE_PDL)
    offs_s = tl.arange(0, BLOCK_S)
    counts = tl.zeros([BLOCK_S], dtype=tl.int32)
    for c0 in range(0, M, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        sl = tl.load(slot_ptr + offs, mask=offs < M, other=-1).to(tl.int32)
        sl = tl.where(sl < S, sl, -1)
        counts += tl.sum((sl[None, :] == offs_s[:, None]).to(tl.int32), axis=1)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    tl.store(num_padded_ptr, total)
    tl.store(cursor_ptr + offs_s, padded_end - padded, mask=offs_s < S)
    for e0 in range(0, EM, CHUNK):
        offs = e0 + tl.arange(0, CHUNK)
        tl.store(sorted_rows_ptr + offs, tl.zeros([CHUNK], dtype=tl.int32) + M, mask=offs < EM)
    for b0 in range(0, NUM_BLOCKS, CHUNK):
        offs_b = b0 + tl.arange(0, CHUNK)
        begin = offs_b * BLOCK_M
        s_of_b = tl.sum((padded_end[:, None] <= begin[None, :]).to(tl.int32), axis=0)
        tl.store(block_slot_ptr + offs_b, tl.where(begin < total, s_of_b, -1), mask=offs_b < NUM_BLOCKS)
    tl.debug_barrier()  # cursors and sentinels written before any thread scatters
    for c0 in range(0, M, CHUNK):
        offs = c0 + tl.arange(0, CHUNK)
        sl = tl.load(slot_ptr + offs, mask=offs < M, other=-1)
        ok = (sl >= 0) & (sl < S)  # rows outside [0, S) are skipped (padding)
        pos = tl.atomic_add(cursor_ptr + sl, tl.full([CHUNK], 1, dtype=tl.int32), mask=ok)
        tl.store(sorted_rows_ptr + pos, offs, mask=ok)


def align_rows_by_slot(slot: torch.Tensor, S: int, block_m: int):
    """slot [M] -> (sorted_rows [EM] int32 (sentinel M in padding), block_slot [EM // block_m] int32 (-1 past the
    end), num_padded [1] int32). EM = M + min(M, S) * (block_m - 1) rounded up to block_m: a bound from shapes,
    so the outputs' shapes (and the GEMM grids) do not depend on the routing. One launch, no host sync."""
    M = slot.shape[0]
    em = _padded_rows(M, S, block_m)
    dev = slot.device
    sorted_rows = torch.empty(em, dtype=torch.int32, device=dev)
    block_slot = torch.empty(em // block_m, dtype=torch.int32, device=dev)
    scratch = torch.empty(1 + S, dtype=torch.int32, device=dev)  # num_padded, per-slot cursors
    block_s = max(16, triton.next_power_of_2(S))
    _align_kernel[(1,)](
        slot, sorted_rows, block_slot, scratch, scratch[1:], M, S, em, em // block_m,
        BLOCK_M=block_m, BLOCK_S=block_s, CHUNK=max(16, min(256, 16384 // block_s)), num_warps=8,
        **pdl_args(slot),
    )
    return sorted_rows, block_slot, scratch[:1]


@triton.jit
def _tile_ids(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row blocks sweep the N tiles together so their weight tiles stay in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _block_rows(pid_m, sorted_rows_ptr, block_slot_ptr, num_padded_ptr, M, S, BLOCK_M: tl.constexpr,
                PAIR_BLOCKS: tl.constexpr):
    """Row block pid_m -> (its slot, -1: nothing to do; its BLOCK_M row ids, M: none). Sorted: as
    align_rows_by_slot laid them out. PAIR_BLOCKS: block m is pair m alone (block_slot_ptr: the pairs' slots),
    for a few pairs of distinct slots (one token's top-k), where sorting them costs more than the rows it saves."""
    offs = tl.arange(0, BLOCK_M)
    s = tl.load(block_slot_ptr + pid_m).to(tl.int64)
    if PAIR_BLOCKS:
        s = tl.where((s >= 0) & (s < S), s, -1)  # padding pairs (slot -1) and slots of other ranks: skipped
        rows = tl.where(offs == 0, pid_m, M)
    else:
        s = tl.where(pid_m * BLOCK_M < tl.load(num_padded_ptr), s, -1)
        rows = tl.load(sorted_rows_ptr + pid_m * BLOCK_M + offs)
    return s, rows


@triton.jit(do_not_specialize=["M", "EM"])
def _w13_silu_kernel(
    x_ptr, w13_ptr, h_ptr, sorted_rows_ptr, block_slot_ptr, num_padded_ptr, scale_ptr,
    M, D, I, EM, S,
    stride_xm, stride_we, stride_wn, stride_hm, stride_se, stride_sn, stride_sk, up_scale_row,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SCALES: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
    FANOUT: tl.constexpr, PAIR_BLOCKS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    num_m = tl.cdiv(EM, BLOCK_M)
    num_n = tl.cdiv(I, BLOCK_N)
    pid_m, pid_n = _tile_ids(pid, num_m, num_n, GROUP_M)
    s, rows = _block_rows(pid_m, sorted_rows_ptr, block_slot_ptr, num_padded_ptr, M, S, BLOCK_M, PAIR_BLOCKS)
    if s < 0:
        return
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < I
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + (rows // FANOUT)[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # pair -> its x row
    # w13[s] is [2I, D] row-major; read as [BLOCK_K, BLOCK_N] tiles of its transpose
    g_ptrs = w13_ptr + s * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]
    u_ptrs = g_ptrs + I * stride_wn
    if HAS_SCALES:  # scales of the tile's columns: gate rows' blocks, then up rows' from up_scale_row
        sg_ptrs = scale_ptr + s * stride_se + (offs_n // SCALE_N) * stride_sn
        su_ptrs = sg_ptrs + up_scale_row * stride_sn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_SCALES:
            kb = (k0 // SCALE_K) * stride_sk
            sg = tl.load(sg_ptrs + kb, mask=n_ok, other=0.0)
            su = tl.load(su_ptrs + kb, mask=n_ok, other=0.0)
            acc_g += tl.dot(a, g.to(a.dtype), input_precision=PRECISION) * sg[None, :]
            acc_u += tl.dot(a, u.to(a.dtype), input_precision=PRECISION) * su[None, :]
        else:
            acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
            acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        g_ptrs += BLOCK_K
        u_ptrs += BLOCK_K
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    h_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_n[None, :]
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=n_ok[None, :])


@triton.jit(do_not_specialize=["M", "EM"])
def _w2_kernel(
    h_ptr, w2_ptr, out_ptr, sorted_rows_ptr, block_slot_ptr, num_padded_ptr, scale_ptr,
    M, D, I, EM, S,
    stride_hm, stride_we, stride_wn, stride_om, stride_se, stride_sn, stride_sk,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PRECISION: tl.constexpr, HAS_SCALES: tl.constexpr, SCALE_N: tl.constexpr, SCALE_K: tl.constexpr,
    PAIR_BLOCKS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    pid = tl.program_id(0)
    num_m = tl.cdiv(EM, BLOCK_M)
    num_n = tl.cdiv(D, BLOCK_N)
    pid_m, pid_n = _tile_ids(pid, num_m, num_n, GROUP_M)
    s, rows = _block_rows(pid_m, sorted_rows_ptr, block_slot_ptr, num_padded_ptr, M, S, BLOCK_M, PAIR_BLOCKS)
    if s < 0:
        return
    offs_p = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < D
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = h_ptr + offs_p[:, None].to(tl.int64) * stride_hm + offs_k[None, :]
    b_ptrs = w2_ptr + s * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None]  # w2[s] is [D, I]
    if HAS_SCALES:
        s_ptrs = scale_ptr + s * stride_se + (offs_n // SCALE_N) * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k_ok = offs_k < I - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if HAS_SCALES:
            sc = tl.load(s_ptrs + (k0 // SCALE_K) * stride_sk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b.to(a.dtype), input_precision=PRECISION) * sc[None, :]
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    o_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + offs_n[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _scale_args(scales: BlockScales | None, w13: torch.Tensor, w2: torch.Tensor, S: int, I: int, D: int,
                block_k13: int, block_k2: int):
    """(w13 scale tensor, w2 scale tensor, SCALE_N, SCALE_K for w13, SCALE_K for w2, up_scale_row); the weights
    themselves stand in as (unread) scale pointers without scales."""
    if scales is None:
        return w13, w2, 1, 1, 1, 0
    bn, bk = scales.block
    assert w13.dtype == w2.dtype == FP8, (w13.dtype, w2.dtype)
    s13, s2 = expert_scale_shapes(I, D, scales.block)
    assert scales.w13.shape == (S, *s13) and scales.w2.shape == (S, *s2), (scales.w13.shape, scales.w2.shape, s13, s2)
    assert scales.w13.dtype == scales.w2.dtype == torch.float32
    assert scales.w13.is_contiguous() and scales.w2.is_contiguous()

    def group_k(K: int, block_k: int) -> int:
        if bk >= K:  # one scale column: every K tile reads column 0
            return triton.next_power_of_2(K)
        assert bk % block_k == 0 and block_k >= 16, f"K tiles of {block_k} do not fit scale blocks of {bk}"
        return bk

    return scales.w13, scales.w2, bn, group_k(D, block_k13), group_k(I, block_k2), s13[0] // 2


def swiglu_experts_triton(
    x: torch.Tensor, slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, config: MoEConfig | None = None,
    out: torch.Tensor | None = None, scales: BlockScales | None = None,
) -> torch.Tensor:
    """x [R, D], slot [M] (M = R * fanout: pair m reads row m // fanout) -> [M, D] (unweighted expert outputs);
    same contract as the reference, plus: pairs whose slot is outside [0, S) are skipped and their output rows
    left unwritten (padding of a fixed-size batch). With `scales`, w13 and w2 are fp8 (e4m3) with those block
    scales (W8A16: x stays in its dtype)."""
    R, D = x.shape
    M = slot.shape[0]
    fanout = M // R if R else 1
    assert M == R * fanout, (x.shape, slot.shape)
    S, two_i, _ = w13.shape
    I = two_i // 2
    assert w13.shape == (S, 2 * I, D) and w2.shape == (S, D, I), (x.shape, w13.shape, w2.shape)
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16)
    assert scales is not None or x.dtype == w13.dtype == w2.dtype, (x.dtype, w13.dtype, w2.dtype)
    assert w13.stride(-1) == 1 and w2.stride(-1) == 1 and w13.stride(1) == D and w2.stride(1) == I
    out = x.new_empty(M, D) if out is None else out
    assert out.shape == (M, D) and out.dtype == x.dtype and out.stride(-1) == 1
    if M == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = config or pick_config(M, S, D, I, x.dtype, fp8=scales is not None)
    slot = slot.to(x.device)
    if R == 1 and M <= PAIR_BLOCKS_MAX_PAIRS and pair_blocks_enabled():
        # one token: its k pairs have distinct slots, so each pair is a row block of its own, no sort
        _launch(x, w13, w2, out, slot, slot, slot, M, fanout, cfg, scales, pair_blocks=True)
        return out
    sorted_rows, block_slot, num_padded = align_rows_by_slot(slot, S, cfg.BLOCK_M)
    _launch(x, w13, w2, out, sorted_rows, block_slot, num_padded, M, fanout, cfg, scales)
    return out


def batched_rows(counts: torch.Tensor, rows_per_expert: int, block_m: int, sentinel: int, max_rows: int = 0):
    """The `align_rows_by_slot` outputs for rows already grouped by expert, as nixl_ep's dispatch delivers them
    (expert e's rows at e * rows_per_expert + [0, counts[e])): the blocks that hold rows come first, in expert
    order; rows past the counts read `sentinel` (skipped). No host sync, shapes from the layout alone.
    max_rows > 0: at most that many rows arrive in all (known from the step's agreed tokens per rank), so no more
    than max_rows / block_m + E blocks can hold any: the list (and the kernels' grids) stop there, instead of
    covering every expert's full capacity, most of it empty programs."""
    E, dev = counts.shape[0], counts.device
    per = -(-rows_per_expert // block_m)  # blocks an expert can fill
    num_blocks = E * per if not max_rows else min(E * per, -(-max_rows // block_m) + E)
    blocks = (counts.to(torch.int64) + block_m - 1) // block_m  # [E]
    ends = torch.cumsum(blocks, 0)
    b = torch.arange(num_blocks, device=dev)
    e = torch.searchsorted(ends, b, right=True).clamp_max(E - 1)  # the expert of block b (past the end: E - 1)
    first_row = (b - (ends[e] - blocks[e])) * block_m  # of block b inside its expert
    i = torch.arange(block_m, device=dev)
    t = first_row[:, None] + i[None, :]
    ok = (b < ends[-1])[:, None] & (t < counts.to(torch.int64)[e][:, None])
    sorted_rows = torch.where(ok, e[:, None] * rows_per_expert + t, sentinel).to(torch.int32).reshape(-1)
    num_padded = (ends[-1:] * block_m).to(torch.int32)
    return sorted_rows, e.to(torch.int32), num_padded


def swiglu_experts_batched_triton(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                                  scales: BlockScales | None = None, rows_hint: int = 0,
                                  max_rows: int = 0) -> torch.Tensor:
    """x [E, N, D]: expert e's rows first in x[e], counts[e] of them (counts on the device: never read by the
    host) -> [E, N, D], row (e, t) through the expert in local slot e for t < counts[e]; the rest unwritten.
    Slots past w13's get no rows (E may exceed the slots a rank holds). rows_hint: about how many rows arrive in
    all (picks the tiles; default: as if every expert were full); max_rows: at most this many rows in all (0: no
    bound; a bound the counts exceed loses rows)."""
    E, N, D = x.shape
    S, two_i, _ = w13.shape
    I = two_i // 2
    out = x.new_empty(E, N, D)
    if E * N == 0:
        return out
    counts = counts[:S] if E > S else counts
    cfg = pick_config(rows_hint or min(E, S) * N, S, D, I, x.dtype, fp8=scales is not None)
    sorted_rows, block_slot, num_padded = batched_rows(counts, N, cfg.BLOCK_M, E * N, max_rows)
    flat = x.reshape(E * N, D)
    _launch(flat if flat.stride(-1) == 1 else flat.contiguous(), w13, w2, out.view(E * N, D), sorted_rows,
            block_slot, num_padded, E * N, 1, cfg, scales)
    return out


def _launch(x, w13, w2, out, sorted_rows, block_slot, num_padded, M: int, fanout: int, cfg: MoEConfig,
            scales: BlockScales | None, pair_blocks: bool = False) -> None:
    """The two grouped GEMMs over rows sorted by slot (sorted_rows/block_slot/num_padded as align_rows_by_slot),
    or, pair_blocks, over the M pairs as they come, one row block each (block_slot: their slots)."""
    D = x.shape[1]
    S, two_i, _ = w13.shape
    I = two_i // 2
    # w2's K is I: no K tile wider than I (rounded up to a power of two) for tiny models
    bk13, bk2 = cfg.BLOCK_K, min(cfg.BLOCK_K, max(16, triton.next_power_of_2(I)))
    if scales is not None:  # K tiles no wider than a scale block (128 for the checkpoints seen: no change)
        bk13 = bk13 if scales.block[1] >= D else min(bk13, scales.block[1])
        bk2 = bk2 if scales.block[1] >= I else min(bk2, scales.block[1])
    s13, s2, scale_n, scale_k13, scale_k2, up_row = _scale_args(scales, w13, w2, S, I, D, bk13, bk2)
    EM = M * cfg.BLOCK_M if pair_blocks else sorted_rows.shape[0]
    h = torch.empty(EM, I, dtype=x.dtype, device=x.device)
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    num_m = EM // cfg.BLOCK_M
    has_scales = scales is not None
    _w13_silu_kernel[(num_m * triton.cdiv(I, cfg.BLOCK_N),)](
        x, w13, h, sorted_rows, block_slot, num_padded, s13,
        M, D, I, EM, S,
        x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        s13.stride(0) if has_scales else 0, s13.stride(1) if has_scales else 0, s13.stride(2) if has_scales else 0,
        up_row,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=bk13, GROUP_M=cfg.GROUP_M, PRECISION=precision,
        HAS_SCALES=has_scales, SCALE_N=scale_n, SCALE_K=scale_k13, FANOUT=fanout, PAIR_BLOCKS=pair_blocks,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x),
    )
    _w2_kernel[(num_m * triton.cdiv(D, cfg.BLOCK_N),)](
        h, w2, out, sorted_rows, block_slot, num_padded, s2,
        M, D, I, EM, S,
        h.stride(0), w2.stride(0), w2.stride(1), out.stride(0),
        s2.stride(0) if has_scales else 0, s2.stride(1) if has_scales else 0, s2.stride(2) if has_scales else 0,
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=bk2, GROUP_M=cfg.GROUP_M, PRECISION=precision,
        HAS_SCALES=has_scales, SCALE_N=scale_n, SCALE_K=scale_k2, PAIR_BLOCKS=pair_blocks,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x),
    )
