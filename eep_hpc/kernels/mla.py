"""Multi-head latent attention (DeepSeek-V2) over a compressed paged cache: torch reference (CPU, tests).

The cache of one layer is [num_blocks, block_size, R + P]: per token the normalized latent c_kv [R] (kv_lora_rank)
followed by the roped shared key k_pe [P] (qk_rope_head_dim). Attention expands the cached latents with kv_b_proj
(W [H * (N + V), R]) into per-head keys [N] (concatenated with k_pe) and values [V], then runs causal attention like
kernels/attention.py (same AttentionMetadata). Shapes: T packed new tokens, H heads, N qk_nope_head_dim, V
v_head_dim. A GPU kernel would absorb W's key half into q and attend in latent space; this reference does not.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from eep_hpc.kernels.attention import AttentionMetadata


def write_latent(c_kv: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """c_kv [T, R], k_pe [T, P] into cache [num_blocks, block_size, R + P] at flat slots [T]."""
    R = c_kv.shape[-1]
    assert cache.shape[-1] == R + k_pe.shape[-1], f"cache rows {cache.shape[-1]} != {R} + {k_pe.shape[-1]}"
    flat = cache.view(-1, cache.shape[-1])
    flat[slots, :R] = c_kv.to(cache.dtype)
    flat[slots, R:] = k_pe.to(cache.dtype)


def mla_attention_reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    w_kv_b: torch.Tensor,
    meta: AttentionMetadata,
    kv_lora_rank: int,
    v_head_dim: int,
    scale: float,
) -> torch.Tensor:
    """q [T, H, N + P] (rope part already rotated) -> [T, H, V], attending over the cache (new tokens written)."""
    T, H, Dqk = q.shape
    R, V = kv_lora_rank, v_head_dim
    N = w_kv_b.shape[0] // H - V
    assert w_kv_b.shape == (H * (N + V), R), f"kv_b weight {tuple(w_kv_b.shape)} != {(H * (N + V), R)}"
    if T == 0:
        return q.new_empty(0, H, V)
    B, lq, lk = meta.mask.shape[0], meta.mask.shape[2], meta.mask.shape[3]
    rows = cache.view(-1, cache.shape[-1])[meta.kv_index]  # [B, Lk, R + P]
    c_kv, k_pe = rows[..., :R], rows[..., R:]
    kv = F.linear(c_kv, w_kv_b).view(B, lk, H, N + V)
    k_nope, values = kv.split([N, V], dim=-1)
    keys = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, lk, H, Dqk - N)], dim=-1)  # [B, Lk, H, N + P]
    q_pad = q.new_zeros(B, lq, H, Dqk)
    q_pad[meta.token_batch, meta.token_row] = q
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), attn_mask=meta.mask, scale=scale
    )  # [B, H, Lq, V]
    return out.transpose(1, 2)[meta.token_batch, meta.token_row]
