"""RMSNorm (and residual-add + RMSNorm) in Triton: the GPU path of `norm.rms_norm_reference`.

One pass over the rows: BLOCK_R rows of BLOCK_D (>= D) elements per program, sum of squares in fp32, the
normalised value rounded to the input dtype before the weight multiply, as Hugging Face (and the reference) do.
Rows of any leading shape ([T, D] hidden states, [T, H, Dh] per-head q/k norms) are flattened to [R, D].
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from eep_hpc.kernels.pdl import pdl_args, pdl_start


@triton.jit(do_not_specialize=["R"])
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, r_out_ptr, R, D, eps,
    stride_x, stride_r, stride_o, stride_ro,
    HAS_RESIDUAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pdl_start(USE_PDL)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rows64 = rows.to(tl.int64)
    ok = (rows[:, None] < R) & (cols[None, :] < D)
    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=ok, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows64[:, None] * stride_r + cols[None, :], mask=ok, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # the sum is rounded like torch's x + r
        tl.store(r_out_ptr + rows64[:, None] * stride_ro + cols[None, :], x, mask=ok)
    x32 = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x32 * x32, 1) / D + eps)
    w = tl.load(w_ptr + cols, mask=cols < D, other=0.0)
    y = (x32 * rstd[:, None]).to(x.dtype).to(tl.float32) * w.to(tl.float32)[None, :]
    tl.store(out_ptr + rows64[:, None] * stride_o + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=ok)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, out=None):
    D = x.shape[-1]
    assert weight.shape == (D,) and x.stride(-1) == 1
    x2 = x.reshape(-1, D)
    R = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    out = torch.empty(R, D, dtype=out_dtype, device=x.device) if out is None else out.view(R, D)
    assert out.dtype == out_dtype
    r2 = residual.reshape(-1, D) if residual is not None else x2
    r_out = torch.empty_like(x2) if residual is not None else out
    if R:
        block_d = triton.next_power_of_2(D)
        block_r = max(1, min(64, 4096 // block_d))
        _rms_norm_kernel[(triton.cdiv(R, block_r),)](
            x2, r2, weight, out, r_out, R, D, eps,
            x2.stride(0), r2.stride(0), out.stride(0), r_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK_R=block_r, BLOCK_D=block_d,
            num_warps=8 if block_d * block_r >= 4096 else 4, **pdl_args(out),
        )
    return out.view(*x.shape[:-1], D), r_out.view(*x.shape[:-1], D)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] -> [..., D] (into `out` when given)."""
    return _launch(x, None, weight, eps, out)[0]


def add_rms_norm_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(x, residual) [..., D] -> (rms_norm(x + residual), x + residual) in one pass."""
    assert residual.shape == x.shape and residual.dtype == x.dtype and residual.stride(-1) == 1
    return _launch(x, residual, weight, eps)
