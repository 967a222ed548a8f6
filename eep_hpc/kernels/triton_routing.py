"""MoE routing for one layer in one Triton launch: the GPU path of `routing.route_topk_reference`.

Each program takes BLOCK_T tokens and holds their logits as a [BLOCK_T, BLOCK_E] fp32 tile (BLOCK_E >= E a power
of two, columns past E masked), then, all in registers:
1. softmax statistics in fp32: row max m and s = sum(exp(x - m));
2. top-k by TOP_K rounds of repeated max. Each (token, expert) gets one int64 key: the logit's bits mapped to an
   order-preserving int32 in the high half, BLOCK_E - 1 - expert in the low half, so one max reduction finds the
   largest logit and, among equal logits, the LOWER expert index; the winner's key is then set below every real
   key. Ranking logits rather than probabilities gives the same order (softmax is monotonic) without rounding
   ties between close logits (NaN ranks first, as in torch.topk, unless its sign bit is set).
   weight = exp(v - m) / s, renormalised over the k picks when asked;
3. replica choice as `ExpertMap.choose_slots`: token t's j-th expert e takes replica (t + j) % replica_count[e],
   slot = logical_to_physical[e, pick] (two small gathers from the layer's tables);
4. load count: the tile's picks are summed per expert ([BLOCK_E] histogram) and added to load_row with one
   vectorised relaxed atomic add per program, masked to the experts that got tokens.
Slots (int64) and weights (fp32) are stored as [BLOCK_T, BLOCK_K] tiles.

Rows per program (`_config`, from an H100 sweep of 1-64 rows x 1-8 warps): Triton spreads a tile's warps over
the E axis, so a multi-warp reduction goes through shared memory (presumably why more warps per row lost), and
small batches run one row per one-warp program (reductions in warp shuffles); from T * BLOCK_E > 65536 on
(T > 512 at E = 128) 16 rows per 4-warp program win. H100, bf16 logits, E = 128, k = 8, renormalised, time per
call inside a CUDA graph of 10 (the torch composition in brackets): T = 1: 3.2 us (28.9), 64: 3.3 (37.2),
512: 4.5 (40.6), 2048: 6.7 (55.8), 8192: 11.8 (111.7). E = 512, k = 16: one row per program was best at every T
(T = 1: 6.3 us (33.1), 8192: 47.7 (261.1)). Uncaptured calls are host-bound: about 46 us (one Triton launch)
against 160 us for the torch composition. Two configs at most per (E, k, dtype); T is not specialised, the grid
depends on T alone and nothing syncs with the host, so a CUDA graph can capture any T.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eep_hpc.kernels.pdl import pdl_args, pdl_start

_TAKEN = tl.constexpr(-(2**63))  # the key of a taken (or masked) expert


@triton.jit(do_not_specialize=["T"])
def _route_topk_kernel(
    logits_ptr, load_ptr, count_ptr, l2p_ptr, slots_ptr, weights_ptr, num_valid_ptr, T, E,
    stride_lt, stride_le, stride_load, stride_count, stride_pe, stride_pr,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, HAS_VALID: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):  # fmt: skip
    pdl_start(USE_PDL)
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    rows64 = rows.to(tl.int64)
    row_ok = rows < T
    ok = row_ok[:, None] & (cols[None, :] < E)
    x_ptrs = logits_ptr + rows64[:, None] * stride_lt + cols[None, :] * stride_le
    x = tl.load(x_ptrs, mask=ok, other=float("-inf")).to(tl.float32)
    # padding rows get m = 0, s = 1: finite, no NaN from -inf - -inf
    m = tl.where(row_ok, tl.max(x, 1), 0.0)
    s = tl.where(row_ok, tl.sum(tl.exp(x - m[:, None]), 1), 1.0)

    # one int64 key per (token, expert): the logit's bits as an order-preserving int32 on top, the reversed
    # expert index below, so that one max finds the largest logit and, among equal ones, the lowest expert
    bits = x.to(tl.int32, bitcast=True)
    hi = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = (hi.to(tl.int64) << 32) | (BLOCK_E - 1 - cols)[None, :].to(tl.int64)
    key = tl.where(ok, key, _TAKEN)
    top_v = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(key, 1)
        i = BLOCK_E - 1 - (best & 0xFFFFFFFF).to(tl.int32)
        hb = (best >> 32).to(tl.int32)
        v = tl.where(hb >= 0, hb, hb ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        key = tl.where(cols[None, :] == i[:, None], _TAKEN, key)
        top_v = tl.where(kcols[None, :] == j, v[:, None], top_v)
        top_i = tl.where(kcols[None, :] == j, i[:, None], top_i)

    k_ok = row_ok[:, None] & (kcols[None, :] < TOP_K)
    w = tl.where(k_ok, tl.exp(top_v - m[:, None]) / s[:, None], 0.0)
    if RENORMALIZE:
        w = w / tl.where(row_ok, tl.sum(w, 1), 1.0)[:, None]
    e = tl.minimum(top_i, E - 1).to(tl.int64)  # (padding rows: masked anyway)
    count = tl.load(count_ptr + e * stride_count, mask=k_ok, other=1)
    pick = (rows64[:, None] + kcols[None, :]) % tl.maximum(count, 1).to(tl.int64)
    slot = tl.load(l2p_ptr + e * stride_pe + pick * stride_pr, mask=k_ok, other=-1)
    if HAS_VALID:  # rows from num_valid on are a graph's padding: never dispatched, never counted
        valid = rows < tl.load(num_valid_ptr)
        slot = tl.where(valid[:, None], slot, -1)
        w = tl.where(valid[:, None], w, 0.0)
        ok = ok & valid[:, None]
    out_offs = rows64[:, None] * TOP_K + kcols[None, :]
    tl.store(slots_ptr + out_offs, slot.to(tl.int64), mask=k_ok)
    tl.store(weights_ptr + out_offs, w.to(weights_ptr.dtype.element_ty), mask=k_ok)

    # [BLOCK_E] picks per expert in this tile, one masked atomic per expert hit
    hist = tl.sum((ok & (key == _TAKEN)).to(tl.int32), 0)
    tl.atomic_add(
        load_ptr + cols * stride_load,
        hist.to(load_ptr.dtype.element_ty),
        mask=(cols < E) & (hist > 0),
        sem="relaxed",
    )


def _config(T: int, block_e: int) -> tuple[int, int]:
    """(BLOCK_T, num_warps): see the module docstring."""
    if block_e >= 512 or T * block_e <= 65536:
        return 1, 1
    return max(1, min(16, 2048 // block_e)), 4


def route_topk_triton(
    logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    load_row: torch.Tensor,
    replica_count_row: torch.Tensor,
    logical_to_physical_row: torch.Tensor,
    weights_dtype: torch.dtype = torch.float32,
    num_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (slots [T, k] int64, weights [T, k] in weights_dtype, computed in fp32); load_row [E] +=
    tokens per expert. num_valid ([1] int on the device): rows from it on get slot -1, weight 0, no load.
    Any strides; the tables must be on logits' device. T = 0 launches nothing."""
    T, E = logits.shape
    assert 1 <= top_k <= E, (top_k, E)
    l2p = logical_to_physical_row
    assert load_row.shape == (E,) and replica_count_row.shape == (E,)
    assert l2p.dim() == 2 and l2p.shape[0] == E, l2p.shape
    assert not (load_row.is_floating_point() or replica_count_row.is_floating_point())
    dev = logits.device
    slots = torch.empty(T, top_k, dtype=torch.int64, device=dev)
    weights = torch.empty(T, top_k, dtype=weights_dtype, device=dev)
    if T == 0:
        return slots, weights
    block_e = triton.next_power_of_2(E)
    block_t, num_warps = _config(T, block_e)
    _route_topk_kernel[(triton.cdiv(T, block_t),)](
        logits, load_row, replica_count_row, l2p, slots, weights,
        num_valid if num_valid is not None else load_row, T, E,
        logits.stride(0), logits.stride(1), load_row.stride(0), replica_count_row.stride(0),
        l2p.stride(0), l2p.stride(1),
        TOP_K=top_k, RENORMALIZE=bool(renormalize), HAS_VALID=num_valid is not None,
        BLOCK_T=block_t, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=num_warps, **pdl_args(logits),
    )  # fmt: skip
    return slots, weights
