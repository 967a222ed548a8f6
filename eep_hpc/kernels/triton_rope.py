"""q/k RMSNorm + Neox RoPE + KV-cache write in Triton: the GPU path of `rope.qk_norm_rope_write_kv_reference`.

One launch replaces the ~30 small torch kernels between the fused QKV projection and paged attention. The
Hq + 2 Hkv heads of a qkv row lie side by side ([q heads | k heads | v heads], Dh each), so the grid is
(T, cdiv(Hq + 2 Hkv, BLOCK_H)): program (t, g) loads heads g*BLOCK_H.. of token t as two [BLOCK_H, Dh/2] halves,
and per row
  - q and k heads: RMSNorm (fp32 sum of squares, normalised value rounded to the input dtype, times the q or k
    weight rounded to the promoted dtype), then RoPE in fp32 on that rounded value with the token's cos/sin row,
    rounded to the promoted dtype once; q rows go to a new contiguous [T, Hq, Dh], k rows to k_cache[slot];
  - v heads: copied unchanged to v_cache[slot].
The cache stores are masked off for slot < 0 (warm-up and CUDA-graph padding tokens). The rounding steps are the
reference's, and fp contraction is off so that x1 cos - x2 sin rounds like torch's separate multiply and subtract.

CUDA-graph capturable: no host sync, the grid depends only on T (which is no kernel argument, so one compiled
kernel serves every T). Positions must lie in [0, max_pos) (not checked: that would need a sync).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eep_hpc.kernels.pdl import pdl_args, pdl_start


@triton.jit
def _qk_norm_rope_write_kv_kernel(
    qkv_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    qw_ptr,
    kw_ptr,
    slot_ptr,
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    eps,
    stride_qkv,
    stride_pos,
    stride_cs,
    stride_slot,
    stride_kc_slot,
    stride_kc_h,
    stride_vc_slot,
    stride_vc_h,
    NUM_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_D: tl.constexpr,
    HAS_NORM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    HALF: tl.constexpr = HEAD_D // 2
    K_END: tl.constexpr = NUM_HEADS + NUM_KV_HEADS
    ALL_HEADS: tl.constexpr = NUM_HEADS + 2 * NUM_KV_HEADS
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # head within [q | k | v]
    d = tl.arange(0, BLOCK_HALF)
    ok = (h[:, None] < ALL_HEADS) & (d[None, :] < HALF)
    src = qkv_ptr + t * stride_qkv + h[:, None] * HEAD_D + d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0)
    x2 = tl.load(src + HALF, mask=ok, other=0.0)
    # promote(qkv, norm weight): the dtype the reference's norm returns
    out_ty = q_ptr.dtype.element_ty
    is_q = h < NUM_HEADS
    if HAS_NORM:
        a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
        ss = tl.sum(a1 * a1, 1) + tl.sum(a2 * a2, 1)
        rstd = tl.rsqrt(ss / HEAD_D + eps)[:, None]
        dm = d < HALF
        w1 = tl.where(
            is_q[:, None],
            tl.load(qw_ptr + d, mask=dm, other=0.0)[None, :],
            tl.load(kw_ptr + d, mask=dm, other=0.0)[None, :],
        ).to(tl.float32)
        w2 = tl.where(
            is_q[:, None],
            tl.load(qw_ptr + HALF + d, mask=dm, other=0.0)[None, :],
            tl.load(kw_ptr + HALF + d, mask=dm, other=0.0)[None, :],
        ).to(tl.float32)
        y1 = ((a1 * rstd).to(x1.dtype).to(tl.float32) * w1).to(out_ty).to(tl.float32)
        y2 = ((a2 * rstd).to(x2.dtype).to(tl.float32) * w2).to(out_ty).to(tl.float32)
    else:
        y1, y2 = x1.to(tl.float32), x2.to(tl.float32)
    pos = tl.load(pos_ptr + t * stride_pos).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * stride_cs + d, mask=d < HALF, other=0.0)[None, :]
    o1 = (y1 * c - y2 * s).to(out_ty)
    o2 = (y2 * c + y1 * s).to(out_ty)

    q_dst = q_ptr + (t * NUM_HEADS + h[:, None]) * HEAD_D + d[None, :]
    tl.store(q_dst, o1, mask=ok & is_q[:, None])
    tl.store(q_dst + HALF, o2, mask=ok & is_q[:, None])
    slot = tl.load(slot_ptr + t * stride_slot).to(tl.int64)
    if slot >= 0:
        is_k = (h >= NUM_HEADS) & (h < K_END)
        k_dst = (
            k_cache_ptr
            + slot * stride_kc_slot
            + (h[:, None] - NUM_HEADS) * stride_kc_h
            + d[None, :]
        )
        # (cast to the cache's dtype on store, like the reference's index put)
        tl.store(k_dst, o1, mask=ok & is_k[:, None])
        tl.store(k_dst + HALF, o2, mask=ok & is_k[:, None])
        is_v = h >= K_END
        v_dst = (
            v_cache_ptr
            + slot * stride_vc_slot
            + (h[:, None] - K_END) * stride_vc_h
            + d[None, :]
        )
        tl.store(v_dst, x1, mask=ok & is_v[:, None])
        tl.store(v_dst + HALF, x2, mask=ok & is_v[:, None])


def qk_norm_rope_write_kv_triton(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm_weight: torch.Tensor | None,
    k_norm_weight: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) Dh] -> q [T, Hq, Dh] (into `out` when given); rotated k and v written into the caches
    [num_blocks, block_size, Hkv, Dh] at the flat slots [T] that are >= 0. One launch (none for T = 0)."""
    T = qkv.shape[0]
    Hq, Hkv, D = num_heads, num_kv_heads, head_dim
    all_heads = Hq + 2 * Hkv
    assert qkv.dim() == 2 and qkv.shape[1] == all_heads * D, (qkv.shape, Hq, Hkv, D)
    assert qkv.stride(-1) == 1
    assert D % 2 == 0 and positions.shape == slot_mapping.shape == (T,)
    assert cos.shape == sin.shape and cos.shape[1] == D // 2, (cos.shape, D)
    assert cos.stride() == sin.stride() and cos.stride(1) == 1
    for cache in (k_cache, v_cache):
        assert cache.shape[2:] == (Hkv, D) and cache.stride(-1) == 1, cache.shape
        # flat slot = block * block_size + offset
        assert cache.stride(0) == cache.shape[1] * cache.stride(1)
    has_norm = q_norm_weight is not None
    assert has_norm == (k_norm_weight is not None)
    if has_norm:
        for w in (q_norm_weight, k_norm_weight):
            assert w.shape == (D,) and w.is_contiguous(), w.shape
        assert q_norm_weight.dtype == k_norm_weight.dtype
        out_dtype = torch.promote_types(qkv.dtype, q_norm_weight.dtype)
    else:
        out_dtype = qkv.dtype
    if out is None:
        q = torch.empty(T, Hq, D, dtype=out_dtype, device=qkv.device)
    else:
        assert out.shape == (T, Hq, D) and out.dtype == out_dtype, (
            out.shape,
            out.dtype,
        )
        assert out.is_contiguous()
        q = out
    if T == 0:
        return q
    block_half = triton.next_power_of_2(D // 2)
    # heads a program: about 1024 elements (8 heads of 128), fewer when there are fewer
    block_h = min(triton.next_power_of_2(all_heads), max(1, 512 // block_half))
    # (the weight pointers are unused without the norm)
    qw, kw = (q_norm_weight, k_norm_weight) if has_norm else (qkv, qkv)
    _qk_norm_rope_write_kv_kernel[(T, triton.cdiv(all_heads, block_h))](
        qkv,
        positions,
        cos,
        sin,
        qw,
        kw,
        slot_mapping,
        q,
        k_cache,
        v_cache,
        eps,
        qkv.stride(0),
        positions.stride(0),
        cos.stride(0),
        slot_mapping.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(1),
        v_cache.stride(2),
        NUM_HEADS=Hq,
        NUM_KV_HEADS=Hkv,
        HEAD_D=D,
        HAS_NORM=has_norm,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=4,
        enable_fp_fusion=False,
        **pdl_args(qkv),
    )
    return q
