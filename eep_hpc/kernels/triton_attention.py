"""Paged attention and KV-cache writes in Triton (the GPU path of `attention.paged_attention_reference`).

One kernel serves the metadata's mixed batch (prefill chunks and decode tokens together). A program owns
BLOCK_Q consecutive query tokens of one sequence and the Q_PER_KV query heads of one KV head (GQA: the K/V tile is
loaded once for all of them, BLOCK_M = BLOCK_Q * Q_PER_KV rows), walks the sequence's KV cache in TILE_N-key tiles
through the block table, and keeps an online softmax (log2 domain). Keys are masked causally at
`seq_len - query_len + row`, so a decode token sees the whole cache and a prefill chunk sees its own prefix.

Split-KV (flash-decoding) when the grid would leave the GPU idle (small decode batches): the KV range of each
program is cut into at most NUM_SEGMENTS parts of at least MIN_SEG_TILES tiles each, written as unnormalised
partials (acc, max, sum) that `_reduce_segments` merges. NUM_SEGMENTS comes from the shapes (a graph stays valid),
the parts that own keys ("live") from the sequence length at run time: the other segment programs exit at once,
segment 0 records the live count per (token, head), a single live part writes the final output itself and the
reduce merges live parts only (a 320-token context with 32 segments: 1-3 parts, not 32). A sequence with seq_len 0 attends to nothing and gets zeros (padding sequences of a CUDA-graph batch:
query_len 1, seq_len 0, slot -1). Program -> sequence uses a binary search on query_start_loc (grid = T // BLOCK_Q + B blocks, a bound
from shapes alone, as in vLLM's unified attention), so the launch depends only on T, B and the config. A pure decode
batch (T == B, max_query_len 1: every sequence brings one token) skips the search: program b is sequence b.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from eep_hpc.kernels.attention import AttentionMetadata
from eep_hpc.kernels.pdl import pdl_args, pdl_start


@dataclass(frozen=True)
class AttentionConfig:
    BLOCK_M: int  # query rows per program (BLOCK_Q tokens x Q_PER_KV heads, padded to a power of two)
    TILE_N: int  # keys per inner step
    NUM_SEGMENTS: int  # at most this many KV parts (split-KV)
    num_warps: int
    num_stages: int
    MIN_SEG_TILES: int = 1  # a KV part holds at least this many TILE_N tiles (short contexts: fewer live parts)


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device() if device.type == "cuda" else -1
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count if device.type == "cuda" else 8
    return _NUM_SMS[idx]


def pick_config(max_query_len: int, num_seqs: int, num_kv_heads: int, q_per_kv: int, head_dim: int,
                dtype: torch.dtype, device: torch.device) -> AttentionConfig:
    """Depends on the batch's shape only (not on sequence lengths), so a captured CUDA graph stays valid.
    Measured on H100 at Qwen3-30B-A3B shapes (kernels/NOTES.md): decode likes 128-key tiles and one segment once
    the (sequence, kv head) programs fill the SMs; split-KV up to 32 segments below that."""
    wide = dtype == torch.float32 or head_dim > 128
    if max_query_len <= 1:  # decode only: one token per program, split the KV range to fill the GPU
        block_m = max(16, triton.next_power_of_2(q_per_kv))
        programs = max(num_seqs * num_kv_heads, 1)
        sms = _num_sms(device)
        segments = 1 if programs >= sms else min(32, triton.next_power_of_2(triton.cdiv(2 * sms, programs)))
        return AttentionConfig(block_m, 32 if wide else 128, segments, 4, 2, _min_seg_tiles())
    block_m = max(32 if wide else 64, triton.next_power_of_2(q_per_kv))
    return AttentionConfig(block_m, 32 if wide else 64, 1, 4, 2, _min_seg_tiles())


def live_segments_enabled() -> bool:
    """`EEP_HPC_ATTN_LIVE_SEGMENTS=0`: the split-KV as before (every segment program runs and writes a partial,
    the reduce merges all NUM_SEGMENTS of them, decode programs search their sequence): for before/after timings."""
    return os.environ.get("EEP_HPC_ATTN_LIVE_SEGMENTS", "1") != "0"


def _min_seg_tiles() -> int:
    # 1: a short context keeps one tile per program, as before (2 tiles per part was slower at batch 1 on an H100:
    # attention + reduce 405 us a step against 347 us, fewer programs working in parallel); the gain is the
    # partials nobody writes and the reduce that merges live parts only
    return 1 if live_segments_enabled() else 0


@triton.jit(do_not_specialize=["num_seqs", "stride_bt"])  # batch-dependent ints: no recompiles
def _paged_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr, seg_live_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    scale_log2, num_seqs,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_bt,
    NUM_Q_HEADS: tl.constexpr, Q_PER_KV: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr, PAGE: tl.constexpr, TILE_N: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr, MIN_SEG_TILES: tl.constexpr, DECODE: tl.constexpr, PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    qb = tl.program_id(0)
    kvh = tl.program_id(1)
    seg = tl.program_id(2)
    if DECODE:  # T == B and every sequence brings one token: program qb is sequence qb and token qb
        s = qb
        q_start = qb
        q_len = 1
        local_qb = 0
    else:
        # sequence of this query block: the last s with query_start_loc[s] // BLOCK_Q + s <= qb
        lo = 0
        hi = num_seqs
        while lo < hi:
            mid = (lo + hi) // 2
            if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= qb:
                lo = mid + 1
            else:
                hi = mid
        s = lo - 1
        # metadata is int64; positions and masks are computed in int32 (int64 [BLOCK_M, TILE_N] masks cost ~10 % at
        # prefill)
        q_start = tl.load(query_start_loc_ptr + s).to(tl.int32)
        q_len = tl.load(query_start_loc_ptr + s + 1).to(tl.int32) - q_start
        local_qb = qb - (q_start // BLOCK_Q + s)
        if local_qb * BLOCK_Q >= q_len:
            return
    seq_len = tl.load(seq_lens_ptr + s).to(tl.int32)
    context = seq_len - q_len

    kv_len = tl.minimum(seq_len, context + (local_qb + 1) * BLOCK_Q)  # keys any row of this block may see
    num_tiles = tl.cdiv(kv_len, TILE_N)
    if MIN_SEG_TILES == 0:  # every segment runs (EEP_HPC_ATTN_LIVE_SEGMENTS=0)
        per_seg = tl.cdiv(num_tiles, NUM_SEGMENTS)
        live = NUM_SEGMENTS
    else:  # parts of at least MIN_SEG_TILES tiles: `live` of them own keys (0 when there are none)
        per_seg = tl.maximum(tl.cdiv(num_tiles, NUM_SEGMENTS), MIN_SEG_TILES)
        live = tl.cdiv(num_tiles, per_seg)
        if (seg > 0) & (seg >= live):
            return
    t_begin = seg * per_seg
    t_end = tl.minimum(t_begin + per_seg, num_tiles)

    offs_m = tl.arange(0, BLOCK_M)
    q_row = local_qb * BLOCK_Q + offs_m // Q_PER_KV
    head = kvh * Q_PER_KV + offs_m % Q_PER_KV
    row_ok = (q_row < q_len) & (offs_m < BLOCK_Q * Q_PER_KV)
    offs_d = tl.arange(0, HEAD_D_PAD)
    d_ok = offs_d < HEAD_D
    token = (q_start + q_row).to(tl.int64)
    q = tl.load(q_ptr + token[:, None] * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = context + q_row  # absolute position of each query row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_D_PAD], dtype=tl.float32)
    table = block_tables_ptr + s.to(tl.int64) * stride_bt
    offs_t = tl.arange(0, TILE_N)
    for t in range(t_begin, t_end):
        offs_n = t * TILE_N + offs_t
        n_ok = offs_n < kv_len
        blk = tl.load(table + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
        in_page = offs_n % PAGE
        k_off = blk * stride_kb + in_page * stride_ks + kvh * stride_kh
        v_off = blk * stride_vb + in_page * stride_vs + kvh * stride_vh
        k = tl.load(k_cache_ptr + k_off[None, :] + offs_d[:, None], mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(v_cache_ptr + v_off[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        scores = tl.dot(q, k, input_precision=PRECISION) * scale_log2  # [BLOCK_M, TILE_N]
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet stay at zero
        p = tl.math.exp2(scores - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out_ptrs = out_ptr + token[:, None] * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
    if NUM_SEGMENTS == 1:
        _store_output(out_ptrs, acc, l_i, row_ok[:, None] & d_ok[None, :])
    else:
        if MIN_SEG_TILES > 0:
            if seg == 0:  # the live count, for the reduce
                tl.store(seg_live_ptr + token * NUM_Q_HEADS + head, live, mask=row_ok)
        if live <= 1:  # the whole range in this program: the final output, the reduce skips this row
            _store_output(out_ptrs, acc, l_i, row_ok[:, None] & d_ok[None, :])
        else:
            idx = (token * NUM_Q_HEADS + head) * NUM_SEGMENTS + seg  # partials [T, Hq, NUM_SEGMENTS, (D)]
            tl.store(seg_max_ptr + idx, m_i, mask=row_ok)
            tl.store(seg_sum_ptr + idx, l_i, mask=row_ok)
            tl.store(seg_acc_ptr + idx[:, None] * HEAD_D_PAD + offs_d[None, :], acc, mask=row_ok[:, None])


@triton.jit
def _store_output(out_ptrs, acc, l_i, mask):
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptrs, out.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _reduce_segments(
    out_ptr, seg_acc_ptr, seg_max_ptr, seg_sum_ptr, seg_live_ptr, stride_ot, stride_oh,
    NUM_Q_HEADS: tl.constexpr, HEAD_D: tl.constexpr, HEAD_D_PAD: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    ALL_LIVE: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    if ALL_LIVE:
        live = NUM_SEGMENTS
    else:
        live = tl.load(seg_live_ptr + token * NUM_Q_HEADS + head)
        if live <= 1:  # the attention program wrote the output itself
            return
    base = (token * NUM_Q_HEADS + head) * NUM_SEGMENTS
    offs_s = tl.arange(0, NUM_SEGMENTS)
    s_ok = offs_s < live  # segments past the live ones wrote nothing
    offs_d = tl.arange(0, HEAD_D_PAD)
    m = tl.load(seg_max_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    m_all = tl.max(m, 0)
    m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
    w = tl.math.exp2(m - m_all)  # empty segments: exp2(-inf) = 0
    l = tl.sum(tl.load(seg_sum_ptr + base + offs_s, mask=s_ok, other=0.0) * w, 0)
    acc = tl.load(seg_acc_ptr + (base + offs_s)[:, None] * HEAD_D_PAD + offs_d[None, :], mask=s_ok[:, None],
                  other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(l == 0.0, 1.0, l)
    tl.store(out_ptr + token * stride_ot + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_D)


def _segment_buffers(T: int, Hq: int, nseg: int, d_pad: int, device: torch.device):
    """Partials (acc [T, Hq, nseg, d_pad], max, sum [T, Hq, nseg]) and the live count [T, Hq] (tests poison them)."""
    seg_max = torch.empty(T, Hq, nseg, dtype=torch.float32, device=device)
    return (torch.empty(T, Hq, nseg, d_pad, dtype=torch.float32, device=device), seg_max, torch.empty_like(seg_max),
            torch.empty(T, Hq, dtype=torch.int32, device=device))


def paged_attention_triton(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
    config: AttentionConfig | None = None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D] attending over the cache [num_blocks, block_size, Hkv, D] (new k/v written)."""
    T, Hq, D = q.shape
    _, page, Hkv, _ = k_cache.shape
    assert Hq % Hkv == 0 and k_cache.shape == v_cache.shape and k_cache.shape[-1] == D, (q.shape, k_cache.shape)
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert q.dtype == k_cache.dtype == v_cache.dtype
    out = torch.empty_like(q) if out is None else out
    if T == 0:
        return out
    B = meta.num_seqs
    q_per_kv = Hq // Hkv
    cfg = config or pick_config(meta.max_query_len, B, Hkv, q_per_kv, D, q.dtype, q.device)
    block_q = max(cfg.BLOCK_M // q_per_kv, 1)
    assert block_q * q_per_kv <= cfg.BLOCK_M
    d_pad = max(16, triton.next_power_of_2(D))
    nseg = cfg.NUM_SEGMENTS
    assert nseg & (nseg - 1) == 0, "NUM_SEGMENTS must be a power of two"
    if nseg > 1:
        seg_acc, seg_max, seg_sum, seg_live = _segment_buffers(T, Hq, nseg, d_pad, q.device)
    else:
        seg_acc = seg_max = seg_sum = seg_live = out  # unused
    tables = meta.block_tables
    # a pure decode batch (shapes alone say so: T == B with at most one token each) maps program b to sequence b;
    # kept on the search with EEP_HPC_ATTN_LIVE_SEGMENTS=0 (the before of a before/after)
    decode = meta.max_query_len <= 1 and T == B and cfg.MIN_SEG_TILES > 0
    grid = (B if decode else T // block_q + B, Hkv, nseg)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, seg_acc, seg_max, seg_sum, seg_live,
        tables, meta.seq_lens_device, meta.query_start_loc_device,
        scale * 1.4426950408889634, B,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1), tables.stride(0),
        NUM_Q_HEADS=Hq, Q_PER_KV=q_per_kv, BLOCK_Q=block_q, BLOCK_M=cfg.BLOCK_M,
        HEAD_D=D, HEAD_D_PAD=d_pad, PAGE=page, TILE_N=cfg.TILE_N, NUM_SEGMENTS=nseg,
        MIN_SEG_TILES=cfg.MIN_SEG_TILES, DECODE=decode, PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(q),
    )
    if nseg > 1:
        _reduce_segments[(T, Hq)](
            out, seg_acc, seg_max, seg_sum, seg_live, out.stride(0), out.stride(1),
            NUM_Q_HEADS=Hq, HEAD_D=D, HEAD_D_PAD=d_pad, NUM_SEGMENTS=nseg, ALL_LIVE=cfg.MIN_SEG_TILES == 0,
            num_warps=4, **pdl_args(out),
        )
    return out


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch, stride_dcs, stride_dch,
    NUM_KV_HEADS: tl.constexpr, HEAD_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot < 0:  # padding token (e.g. a CUDA-graph batch larger than the real one)
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_D)
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
    tl.store(k_cache_ptr + slot * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :], k, mask=ok)
    tl.store(v_cache_ptr + slot * stride_dcs + offs_h[:, None] * stride_dch + offs_d[None, :], v, mask=ok)


def write_kv_triton(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    slots: torch.Tensor) -> None:
    """k, v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots [T] (slot < 0: skipped)."""
    T, Hkv, D = k.shape
    if T == 0:
        return
    assert k.stride(-1) == v.stride(-1) == k_cache.stride(-1) == v_cache.stride(-1) == 1
    assert k_cache.stride(0) == k_cache.shape[1] * k_cache.stride(1)  # flat slot = block * block_size + offset
    assert v_cache.stride(0) == v_cache.shape[1] * v_cache.stride(1)
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slots,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=Hkv, HEAD_D=D, BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(D),
        num_warps=4, **pdl_args(k),
    )
