"""DeepSeek's rotary embedding: interleaved pairs, optionally with YaRN frequency scaling and its mscale.

DeepSeek rotates pairs of adjacent channels (2i, 2i+1) by frequency i (transformers' DeepseekV2 treats them as
complex numbers), unlike the Neox halves of layers.RotaryEmbedding. With YaRN, low frequencies are interpolated by
`factor`, high ones kept, a linear ramp between; cos/sin are multiplied by `attention_factor`
(mscale(factor, mscale) / mscale(factor, mscale_all_dim)) and the softmax scale by mscale(factor, mscale_all_dim)^2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from eep_hpc.model.arch import YarnScaling


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_inv_freq(dim: int, theta: float, yarn: YarnScaling) -> torch.Tensor:
    """[dim/2] inverse frequencies, interpolated below the correction range and extrapolated above it."""

    def correction_dim(num_rotations: float) -> float:
        return dim * math.log(yarn.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (yarn.factor * pos_freqs)
    keep = 1 - ramp  # 1: extrapolate (high frequency), 0: interpolate
    return interpolation * (1 - keep) + extrapolation * keep


def yarn_attention_factor(yarn: YarnScaling) -> float:
    if yarn.attention_factor is not None:
        return float(yarn.attention_factor)
    if yarn.mscale and yarn.mscale_all_dim:
        return yarn_get_mscale(yarn.factor, yarn.mscale) / yarn_get_mscale(yarn.factor, yarn.mscale_all_dim)
    return yarn_get_mscale(yarn.factor)


def softmax_mscale(yarn: YarnScaling | None) -> float:
    """Factor on the attention softmax scale (DeepSeek: mscale(factor, mscale_all_dim) squared)."""
    if yarn is None or not yarn.mscale_all_dim:
        return 1.0
    return yarn_get_mscale(yarn.factor, yarn.mscale_all_dim) ** 2


class InterleavedRotaryEmbedding(nn.Module):
    """RoPE on adjacent channel pairs, fp32 cos/sin tables [max_pos, D/2] (already times the yarn attention factor)."""

    def __init__(self, dim: int, max_positions: int, theta: float, yarn: YarnScaling | None = None):
        super().__init__()
        if yarn is None:
            inv_freq, factor = 1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim)), 1.0
        else:
            inv_freq, factor = yarn_inv_freq(dim, theta, yarn), yarn_attention_factor(yarn)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        self.register_buffer("cos", freqs.cos() * factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * factor, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [T, H, D], positions [T]."""
        cos = self.cos[positions][:, None, :]  # [T, 1, D/2]
        sin = self.sin[positions][:, None, :]
        pairs = x.float().unflatten(-1, (-1, 2))  # [T, H, D/2, 2]
        x1, x2 = pairs[..., 0], pairs[..., 1]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.flatten(-2).to(x.dtype)
