"""Attention prologue: per-head q/k RMSNorm, Neox RoPE on q and k, k/v into the paged cache (torch reference).

Everything between the fused QKV projection and paged attention of a decoder layer, in one call:

    qkv [T, (Hq + 2 Hkv) Dh]  (q heads, then k heads, then v heads; rows may be strided, last dim contiguous)
      q, k = rms_norm(q), rms_norm(k)          (per head, skipped when the norm weights are None: Mixtral)
      q, k = rope(q, positions), rope(k, ...)  (Neox: rotate halves, fp32, rounded to the dtype once)
      k_cache[slot], v_cache[slot] = k, v      (slot < 0: not written, e.g. warm-up and CUDA-graph padding)
    -> q [T, Hq, Dh]

The reference composes the existing torch pieces in the model's order (`rms_norm_reference`, the RoPE of
`layers.RotaryEmbedding`, `attention.write_kv`); `triton_rope.py` does the same in one kernel launch and
`qk_norm_rope_write_kv` picks between them like `ops.py`.
"""

from __future__ import annotations

import torch

from eep_hpc.kernels.attention import write_kv
from eep_hpc.kernels.norm import rms_norm_reference


def rope_neox_reference(
    x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> torch.Tensor:
    """x [T, H, D], positions [T], cos/sin [max_pos, D/2] fp32 -> [T, H, D] in x's dtype.

    out = cat(x1 cos - x2 sin, x2 cos + x1 sin) for the halves x1, x2 of x, computed in fp32 (fp64 for fp64 x) and
    rounded to x's dtype once: `layers.RotaryEmbedding.forward` exactly for fp32/bf16/fp16."""
    c = cos[positions][:, None, :]  # [T, 1, D/2]
    s = sin[positions][:, None, :]
    x1, x2 = x.to(torch.promote_types(x.dtype, torch.float32)).chunk(2, dim=-1)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


def qk_norm_rope_write_kv_reference(
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
) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) Dh] -> q [T, Hq, Dh]; rotated k and v written into the caches
    [num_blocks, block_size, Hkv, Dh] at the flat slots [T] that are >= 0.

    q's dtype is qkv's, or promote(qkv, q_norm_weight) with the norm (as `rms_norm_reference` returns)."""
    T, Hq, Hkv, D = qkv.shape[0], num_heads, num_kv_heads, head_dim
    assert qkv.shape[1] == (Hq + 2 * Hkv) * D, (qkv.shape, Hq, Hkv, D)
    assert (q_norm_weight is None) == (k_norm_weight is None)
    q = qkv[:, : Hq * D].reshape(T, Hq, D)
    k = qkv[:, Hq * D : (Hq + Hkv) * D].reshape(T, Hkv, D)
    v = qkv[:, (Hq + Hkv) * D :].reshape(T, Hkv, D)
    if q_norm_weight is not None:
        q = rms_norm_reference(q, q_norm_weight, eps)
        k = rms_norm_reference(k, k_norm_weight, eps)
    q = rope_neox_reference(q, positions, cos, sin)
    k = rope_neox_reference(k, positions, cos, sin)
    # write_kv alone would wrap slot -1 around to the cache's last slot; the boolean
    # index syncs with the host on a GPU (the reference only: the Triton path does not)
    keep = slot_mapping >= 0
    k = k[keep].to(k_cache.dtype)  # (promoted by norm weights wider than qkv)
    write_kv(k, v[keep], k_cache, v_cache, slot_mapping[keep])
    return q


def qk_norm_rope_write_kv(
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
) -> torch.Tensor:
    """`qk_norm_rope_write_kv_reference`, in one Triton kernel when `ops.use_triton(qkv)`."""
    from eep_hpc.kernels import ops  # here, so that ops.py may import this module

    args = (qkv, positions, cos, sin, num_heads, num_kv_heads, head_dim)
    args += (q_norm_weight, k_norm_weight, eps, k_cache, v_cache, slot_mapping)
    if ops.use_triton(qkv):
        from eep_hpc.kernels.triton_rope import qk_norm_rope_write_kv_triton

        return qk_norm_rope_write_kv_triton(*args)
    return qk_norm_rope_write_kv_reference(*args)
