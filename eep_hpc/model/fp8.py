"""FP8 weights at load time: which format a model's weights are in, and a weight source that hands them out either
dequantised (for parameters in the serving dtype) or as (fp8, block scales) for expert slots kept in fp8.

Three cases meet here (see `ModelConfig.quantization`):
- an FP8 checkpoint (config.json `quantization_config`, e.g. Qwen/Qwen3-30B-A3B-FP8): a tensor is fp8 when the
  checkpoint holds its `<name>_scale_inv`;
- FP8 forced on unquantised weights (`quantization = "fp8"`, e.g. dummy weights for benchmarks): the weights an
  FP8 checkpoint quantises (attention and MLP/expert projections; not embeddings, norms, routers, lm_head) are
  quantised blockwise at load, so an fp8 run serves the round-tripped model and a bf16 run of the same seed the
  original;
- FP8 dequantised (`quantization = "none"`, or no GPU kernel for it): every tensor comes out in full precision.
Experts stay fp8 in the model (with per-slot scales) only on CUDA with Triton; dense projections are always
dequantised at load (they are ~3 % of Qwen3-30B-A3B's bytes).
"""

from __future__ import annotations

import re

import torch

from eep_hpc.config import ModelConfig
from eep_hpc.kernels.fp8 import dequantize_blockwise, quantize_blockwise, scale_shape
from eep_hpc.model.arch import Fp8Quantization, MoEArch

# Weights an FP8 checkpoint keeps in fp8 when they are not marked by their own scale (quantisation at load).
_QUANTISED = re.compile(r"\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj|mlp\.experts\.\d+\.(gate|up|down)_proj"
                        r"|block_sparse_moe\.experts\.\d+\.w[123])\.weight$")


def weight_format(cfg: ModelConfig, arch: MoEArch) -> Fp8Quantization | None:
    """The format the model's weights are defined in: the checkpoint's, or fp8 when the config forces it."""
    if cfg.quantization == "fp8":
        return arch.quantization or Fp8Quantization()
    return arch.quantization


def keeps_fp8(device: torch.device) -> bool:
    """Whether fp8 expert slots can be served here (the Triton kernel); else they are dequantised at load."""
    from eep_hpc.kernels import ops

    return device.type == "cuda" and ops.triton_available()


def expert_format(cfg: ModelConfig, arch: MoEArch, device: torch.device) -> Fp8Quantization | None:
    """How the built model stores its expert slots (None: in the serving dtype)."""
    fmt = weight_format(cfg, arch)
    return fmt if fmt is not None and cfg.quantization != "none" and keeps_fp8(device) else None


class Fp8Source:
    """Wraps a checkpoint or dummy source: `get` gives every weight in full precision (dequantised when it is fp8),
    `get_fp8` gives (fp8 [N, K], float32 scales [ceil(N/bn), ceil(K/bk)]) for weights kept in fp8.

    stored=True: the wrapped checkpoint is FP8 and each tensor's own `_scale_inv` says whether it is quantised;
    stored=False: weights are quantised here, by the names an FP8 checkpoint quantises."""

    def __init__(self, inner, fmt: Fp8Quantization, stored: bool):
        self.inner, self.block, self.stored = inner, fmt.block, stored

    def has(self, name: str) -> bool:
        return self.inner.has(name)

    def _quantised(self, name: str) -> bool:
        return self.inner.has(name + "_scale_inv") if self.stored else bool(_QUANTISED.search(name))

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if not self._quantised(name):
            return self.inner.get(name, shape)
        return dequantize_blockwise(*self.get_fp8(name, shape), self.block)

    def get_fp8(self, name: str, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not (self.stored and self._quantised(name)):  # quantised here (also an unquantised one among fp8 ones)
            return quantize_blockwise(self.inner.get(name, shape), self.block)
        q = self.inner.get(name, shape)
        if q.dtype != torch.float8_e4m3fn:
            raise ValueError(f"{name}: has a scale but is {q.dtype}, not float8_e4m3fn")
        return q, self.inner.get(name + "_scale_inv", scale_shape(shape, self.block)).float()
