"""Building blocks of the decoder: linear projections, RMSNorm, rotary embedding, paged GQA attention, dense SwiGLU
MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eep_hpc.kernels import ops
from eep_hpc.kernels.attention import AttentionMetadata
from eep_hpc.kernels.rope import qk_norm_rope_write_kv, rope_neox_reference


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose forward goes through `ops.linear`: the Triton skinny
    GEMM for decode-sized inputs on the GPU, F.linear otherwise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)

    def add_forward(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual): the residual add and the next norm in one pass on the GPU."""
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Neox-style RoPE (rotate halves) with a precomputed fp32 cos/sin table [max_pos, D/2]."""

    def __init__(self, head_dim: int, max_positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, H, D], positions [T]."""
        return rope_neox_reference(x, positions, self.cos, self.sin)


class Attention(nn.Module):
    """GQA over the paged cache. q, k and v come from one projection (`qkv_proj`, rows: q heads, k heads, v heads;
    the loader stacks the checkpoint's q_proj, k_proj and v_proj), and one fused op normalises q and k per head,
    rotates them and writes k and v into the cache."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, qk_norm: bool, eps: float, rope: RotaryEmbedding):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.eps = heads, kv_heads, head_dim, eps
        self.qkv_split = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
        self.qkv_proj = Linear(hidden, sum(self.qkv_split), bias=False)
        self.o_proj = Linear(heads * head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps) if qk_norm else None
        self.rope = rope
        self.scale = head_dim**-0.5

    def forward(self, x, positions, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        return self.attend(self.qkv_proj(x), positions, kv_cache, meta)

    def attend(self, qkv, positions, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata):
        """The rest after `qkv_proj` (which the decoder may have run fused with the norm before it)."""
        T = qkv.shape[0]
        k_cache, v_cache = kv_cache
        q = qk_norm_rope_write_kv(
            qkv, positions, self.rope.cos, self.rope.sin, self.heads, self.kv_heads, self.head_dim,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.eps, k_cache, v_cache, meta.slot_mapping,
        )
        out = ops.paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(out.reshape(T, self.heads * self.head_dim))


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = Linear(hidden, intermediate, bias=False)
        self.up_proj = Linear(hidden, intermediate, bias=False)
        self.down_proj = Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
