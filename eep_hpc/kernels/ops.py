"""The model's kernel entry points: Triton on CUDA tensors when Triton imports, the torch reference otherwise.

`EEP_HPC_KERNELS=reference` forces the reference everywhere (to compare a GPU run against it); the Triton modules
are imported on first use only, so CPU runs never need Triton.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

import torch
import torch.nn.functional as F

from eep_hpc.kernels.attention import AttentionMetadata, paged_attention_reference
from eep_hpc.kernels.attention import write_kv as write_kv_reference
from eep_hpc.kernels.fp8 import BlockScales
from eep_hpc.kernels.moe import swiglu_experts_batched_reference, swiglu_experts_reference
from eep_hpc.kernels.norm import rms_norm_reference


@functools.cache
def triton_available() -> bool:
    if os.environ.get("EEP_HPC_KERNELS", "").lower() == "reference":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and t.dtype in _TRITON_DTYPES and triton_available()


def skinny_gemm_enabled() -> bool:
    """`EEP_HPC_SKINNY_GEMM=0` keeps cuBLAS for every dense projection (read at each call: a benchmark can compare
    both in one process; a captured CUDA graph keeps what it captured)."""
    return os.environ.get("EEP_HPC_SKINNY_GEMM", "1") != "0"


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (+ bias) -> [..., N]: the dense projections (qkv, o_proj, router gate, LM head,
    dense MLP). On CUDA with at most `triton_linear.MAX_M` rows (decode) the Triton skinny GEMM, else F.linear."""
    if (use_triton(x) and x.dtype == weight.dtype and weight.dim() == 2 and weight.stride(-1) == 1
            and 0 < x.numel() <= 16 * x.shape[-1] and skinny_gemm_enabled()):
        from eep_hpc.kernels.triton_linear import skinny_linear_triton

        return skinny_linear_triton(x, weight, bias)
    return F.linear(x, weight, bias)


def row_norm_fusion_enabled() -> bool:
    """`EEP_HPC_FUSED_NORM=0` keeps the norm kernel apart from the projection after it (read at each call)."""
    return os.environ.get("EEP_HPC_FUSED_NORM", "1") != "0"


def rms_norm_linear(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                    weight: torch.Tensor, keep_normed: bool = False):
    """The norm before a projection, and the projection: (y, normed, summed) with summed = x + residual (x when
    residual is None), normed = rms_norm(summed), y = normed @ weight.T; normed is None unless keep_normed. One
    kernel for one row on the GPU (batch-1 decode), the norm then `linear` otherwise."""
    if (use_triton(x) and x.dim() == 2 and x.shape[0] == 1 and x.dtype == weight.dtype == norm_weight.dtype
            and weight.dim() == 2 and weight.stride(-1) == 1 and skinny_gemm_enabled() and row_norm_fusion_enabled()
            and (residual is None or (residual.dtype == x.dtype and residual.is_contiguous()))):
        from eep_hpc.kernels.triton_linear import ROW_NORM_MAX_K, rms_norm_linear_triton

        if x.shape[1] <= ROW_NORM_MAX_K:
            return rms_norm_linear_triton(x, residual, norm_weight, eps, weight, keep_normed)
    if residual is None:
        normed, summed = rms_norm(x, norm_weight, eps), x
    else:
        normed, summed = add_rms_norm(x, residual, norm_weight, eps)
    return linear(normed, weight), (normed if keep_normed else None), summed


def weighted_sum(pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """pairs [T, k, D], weights [T, k] (pairs' dtype) -> [T, D]: each token's k expert outputs, weighted and summed
    with fp32 accumulation in pair order."""
    if use_triton(pairs):
        from eep_hpc.kernels.triton_combine import weighted_sum_triton

        return weighted_sum_triton(pairs, weights)
    return torch.bmm(weights.unsqueeze(1), pairs).squeeze(1)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] -> [..., D]."""
    if use_triton(x):
        from eep_hpc.kernels.triton_norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x, residual) [..., D] -> (rms_norm(x + residual), x + residual)."""
    if use_triton(x):
        from eep_hpc.kernels.triton_norm import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps)
    summed = x + residual
    return rms_norm_reference(summed, weight, eps), summed


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor):
    """k, v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots [T]."""
    if use_triton(k):
        from eep_hpc.kernels.triton_attention import write_kv_triton

        return write_kv_triton(k, v, k_cache, v_cache, slots)
    return write_kv_reference(k, v, k_cache, v_cache, slots)


def paged_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D], attending over the cache (new tokens already written)."""
    if use_triton(q):
        from eep_hpc.kernels.triton_attention import paged_attention_triton

        return paged_attention_triton(q, k_cache, v_cache, meta, scale)
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)


def swiglu_experts(x: torch.Tensor, slot: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                   scales: BlockScales | None = None) -> torch.Tensor:
    """x [R, D], slot [M] -> [M, D]: pair m through the SwiGLU expert in local slot slot[m] (unweighted), on row
    m // (M / R) of x (one rank hands over each token once for its k pairs; an exchange hands over one row each).
    With `scales`, w13/w2 are fp8 with block scales (fp8.py): dequantised in registers on the GPU path, slot by
    slot in the reference."""
    if use_triton(x):
        if scales is None and _prefill_sized(x, slot, w13):  # fp8: dequantising every expert per layer costs more
            from eep_hpc.kernels.grouped_moe import swiglu_experts_grouped

            return swiglu_experts_grouped(x, slot, w13, w2, scales=scales)
        from eep_hpc.kernels.triton_moe import swiglu_experts_triton

        return swiglu_experts_triton(x, slot, w13, w2, scales=scales)
    return swiglu_experts_reference(x, slot, w13, w2, scales)


def one_token_moe_enabled() -> bool:
    """`EEP_HPC_MOE_ONE_TOKEN=0` keeps one token's experts on the grouped GEMMs and the weighted-sum kernel (read at
    each call: a benchmark compares both in one process)."""
    return os.environ.get("EEP_HPC_MOE_ONE_TOKEN", "1") != "0"


def swiglu_experts_combined(x: torch.Tensor, slot: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                            w2: torch.Tensor, scales: BlockScales | None = None) -> torch.Tensor:
    """x [T, D], slot [T * k] (pair m: token m // k, all slots local), weights [T, k] (x's dtype) -> [T, D]: each
    token's k expert outputs weighted and summed, `weighted_sum(swiglu_experts(...))`. One bf16/fp16 token on the
    GPU (batch-1 decode on one rank): two weight-streaming kernels, the sum inside the second
    (triton_moe_one_token.py)."""
    T, k = weights.shape
    if (use_triton(x) and T == 1 and slot.numel() == k and x.dtype == w13.dtype and scales is None
            and x.dtype != torch.float32 and one_token_moe_enabled()):
        from eep_hpc.kernels.triton_moe_one_token import MAX_PAIRS, one_token_experts_triton

        if k <= MAX_PAIRS:
            return one_token_experts_triton(x, slot, weights, w13, w2)
    if (use_triton(x) and scales is None and slot.numel() == T * k and _prefill_sized(x, slot, w13)
            and os.environ.get("EEP_HPC_MOE_SUM_IN_PLACE", "1") != "0"):
        from eep_hpc.kernels.grouped_moe import swiglu_experts_grouped_combined

        return swiglu_experts_grouped_combined(x, slot, weights, w13, w2)
    return weighted_sum(swiglu_experts(x, slot, w13, w2, scales).view(T, k, x.shape[1]), weights)


# rows per slot from which torch's grouped GEMM takes bf16 experts from the Triton kernels (eager steps only: it sorts
# on the device); EEP_HPC_MOE_GROUPED=0 keeps Triton everywhere
GROUPED_MIN_ROWS_PER_SLOT = 64


_graph_kernels = threading.local()


@contextlib.contextmanager
def graph_kernels():
    """Only kernels a CUDA graph can capture (the Triton MoE, not the grouped GEMM's sort): for a capture and for
    the eager forward just before it, so that forward compiles exactly what the capture launches (a Triton kernel
    compiled inside a capture fails it: a 2,048-token mixed graph's MoE tile class was never compiled before)."""
    _graph_kernels.on = True
    try:
        yield
    finally:
        _graph_kernels.on = False


def _prefill_sized(x: torch.Tensor, slot: torch.Tensor, w13: torch.Tensor) -> bool:
    if (slot.shape[0] < GROUPED_MIN_ROWS_PER_SLOT * w13.shape[0] or getattr(_graph_kernels, "on", False)
            or torch.cuda.is_current_stream_capturing()):
        return False
    from eep_hpc.kernels.grouped_moe import grouped_mm_available

    return os.environ.get("EEP_HPC_MOE_GROUPED", "1") != "0" and grouped_mm_available(x)


def swiglu_experts_batched(x: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                           scales: BlockScales | None = None, rows_hint: int = 0, max_rows: int = 0) -> torch.Tensor:
    """x [E, N, D], counts [E] -> [E, N, D]: the first counts[e] rows of x[e] through local expert e (nixl_ep's
    dispatch layout, consumed in place). On the GPU the counts stay on the device; rows past them are unwritten.
    max_rows: a bound on sum(counts) that sizes the kernels' grids (0: every expert's full N)."""
    if use_triton(x):
        from eep_hpc.kernels.triton_moe import swiglu_experts_batched_triton

        return swiglu_experts_batched_triton(x, counts, w13, w2, scales, rows_hint, max_rows)
    return swiglu_experts_batched_reference(x, counts, w13, w2, scales, rows_hint)
