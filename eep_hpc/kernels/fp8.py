"""FP8 (e4m3) weights with block scales, as DeepSeek-V3 / Qwen3 "fine-grained FP8" checkpoints store them.

A weight W [N, K] (out, in) is kept as q = fp8(W / s) [N, K] with one float32 scale per bn x bk block,
s [ceil(N/bn), ceil(K/bk)] (the checkpoint's `<name>_scale_inv`; edge blocks are partial): W ~= q * s, each scale
broadcast over its block. Per-channel scales are the special case block = (1, K).

SwiGLU experts stacked per slot keep their scales beside them, slot first like the weights:
  w13 [S, 2I, D] fp8 with w13_scale [S, 2 * ceil(I/bn), ceil(D/bk)]: the gate rows' scales, then the up rows'
      (gate and up are separate checkpoint tensors, each blocked from its own first row, so I need not be a
      multiple of bn);
  w2 [S, D, I] fp8 with w2_scale [S, ceil(D/bn), ceil(I/bk)].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448


class BlockScales(NamedTuple):
    """The scales of fp8 experts (shapes above) and their block (bn, bk)."""

    w13: torch.Tensor
    w2: torch.Tensor
    block: tuple[int, int]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Scale shape of a weight [N, K]."""
    return cdiv(shape[0], block[0]), cdiv(shape[1], block[1])


def expert_scale_shapes(I: int, D: int, block: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Per-slot scale shapes of (w13 [2I, D], w2 [D, I])."""
    g = scale_shape((I, D), block)
    return (2 * g[0], g[1]), scale_shape((D, I), block)


def _blocks(t: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[..., N, K] -> [..., nb, bn, kb, bk], zero-padded to whole blocks."""
    bn, bk = block
    *lead, N, K = t.shape
    nb, kb = cdiv(N, bn), cdiv(K, bk)
    t = torch.nn.functional.pad(t, (0, kb * bk - K, 0, nb * bn - N))
    return t.reshape(*lead, nb, bn, kb, bk)


def quantize_blockwise(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] -> (q [..., N, K] float8_e4m3fn, scale_inv [..., ceil(N/bn), ceil(K/bk)] float32): each block
    scaled so that its largest magnitude maps to 448, rounded to nearest."""
    *_, N, K = w.shape
    b = _blocks(w.float(), block)
    amax = b.abs().amax(dim=(-3, -1), keepdim=True)  # [..., nb, 1, kb, 1]
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (b / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    q = q.reshape(*w.shape[:-2], b.shape[-4] * block[0], b.shape[-2] * block[1])[..., :N, :K].contiguous()
    return q, scale.squeeze(-1).squeeze(-2).contiguous()


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q [..., N, K] fp8, scale [..., ceil(N/bn), ceil(K/bk)] -> q * scale (computed in fp32) as dtype."""
    *_, N, K = q.shape
    assert scale.shape[-2:] == scale_shape((N, K), block), (q.shape, scale.shape, block)
    s = scale.float().repeat_interleave(block[0], dim=-2)[..., :N, :].repeat_interleave(block[1], dim=-1)[..., :K]
    return (q.float() * s).to(dtype)


def dequantize_w13(q: torch.Tensor, scale: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w13 [..., 2I, D] fp8 with its gate-then-up scales -> [..., 2I, D] dtype."""
    I = q.shape[-2] // 2
    g = scale.shape[-2] // 2
    return torch.cat([dequantize_blockwise(q[..., :I, :], scale[..., :g, :], block, dtype),
                      dequantize_blockwise(q[..., I:, :], scale[..., g:, :], block, dtype)], dim=-2)


def quantize_w13(w13: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w13 [..., 2I, D] -> (fp8 [..., 2I, D], gate-then-up scales), as a checkpoint's separate gate and up give."""
    I = w13.shape[-2] // 2
    (qg, sg), (qu, su) = quantize_blockwise(w13[..., :I, :], block), quantize_blockwise(w13[..., I:, :], block)
    return torch.cat([qg, qu], dim=-2), torch.cat([sg, su], dim=-2)
