"""What every Triton-kernel test file shares: where kernels can run, tolerances, and the poisoned-output error.

Kernel tests run on a CUDA GPU, or without one on the CPU through Triton's interpreter when Triton is installed
(`make install` installs it; tests/conftest.py sets TRITON_INTERPRET=1 when no CUDA GPU is present, so plain
`make test` / `pytest` runs them). The tests call the Triton entry points (`*_triton`) directly; the model's
dispatch (`ops.use_triton`) needs CUDA tensors, so the rest of the suite keeps the torch reference on the CPU.
In the interpreter the shapes are small (cases marked `big` skip) and the dtypes fp32 and bf16.

bf16 in the interpreter (checked with Triton 3.9.0; Triton's debugging guide says the interpreter does not support
bf16 operations, and a fix for the dot was declined upstream, triton-lang/triton#11584): it keeps bf16 tensors as raw
uint16 bits, and
  1. tl.dot on bf16 operands multiplies those bits as integers (errors of ~1e10 relative: the MoE and attention
     kernels fail), and
  2. fp32 -> bf16 casts (`.to(tl.bfloat16)`, and stores of fp32 into bf16 tensors) truncate instead of rounding to
     nearest even as the GPU does (1 bf16 ulp off: MoE/attention errors of 1-4% against the 1e-2 tolerance, and
     `add_rms_norm`'s sum is no longer torch's x + r bit for bit); its own round-to-nearest path
     (`_convert_float` with RTNE) rounds ties up and drops the carry into the exponent (1.99999 -> 1.0), so it
     cannot be used either.
  Loads, stores and copies of bf16 and bf16 -> fp32 casts are exact; the routing and RoPE kernels, which cast to
  fp32 first and back once at the end, pass their bf16 cases unpatched.
`_fix_interpreter_bf16` replaces those two operations, in the interpreter only, with what the GPU does (bf16
operands widened to fp32 exactly before the dot, fp32 accumulate; fp32 -> bf16 rounded to nearest even), then
checks both on a probe kernel; with it every bf16 kernel case passes in the interpreter. If the interpreter's
internals change so that the fix no longer applies or the probe fails, the interpreter runs fp32 only.
Arithmetic or comparisons done directly on bf16 values inside a kernel (the kernels here widen to fp32 first) would
still run on the bits in the interpreter: such a kernel would fail there (garbage), not pass by mistake.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON and not torch.cuda.is_available()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def _fix_interpreter_bf16() -> bool:
    """Make the interpreter's bf16 dot and fp32 -> bf16 cast do what the GPU does (see the module docstring);
    True when a probe kernel then matches torch."""
    try:
        import numpy as np
        import triton
        import triton.language as tl
        from triton.runtime import interpreter

        builder = interpreter.InterpreterBuilder
        handle = interpreter.TensorHandle
        if not getattr(builder, "_eep_bf16_fixed", False):
            dot, cast = builder.create_dot, builder.cast_impl

            def widen(h):
                if h.dtype.scalar != tl.bfloat16:
                    return h
                return handle((np.asarray(h.data).astype(np.uint32) << 16).view(np.float32), tl.float32)

            def create_dot(self, a, b, d, *args, **kwargs):
                return dot(self, widen(a), widen(b), d, *args, **kwargs)

            def cast_impl(self, src, dst_type):
                if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
                    f = np.asarray(src.data, dtype=np.float32)
                    u = f.view(np.uint32)
                    rounded = ((u + np.uint32(0x7FFF) + ((u >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
                    return handle(np.where(np.isnan(f), np.uint16(0x7FC0), rounded), tl.bfloat16)
                return cast(self, src, dst_type)

            builder.create_dot, builder.cast_impl, builder._eep_bf16_fixed = create_dot, cast_impl, True

        @triton.jit
        def probe(a_ptr, b_ptr, dot_ptr, x_ptr, round_ptr, N: tl.constexpr):
            i = tl.arange(0, N)
            tile = i[:, None] * N + i[None, :]
            a, b = tl.load(a_ptr + tile), tl.load(b_ptr + tile)
            tl.store(dot_ptr + tile, tl.dot(a, b, out_dtype=tl.float32))
            tl.store(round_ptr + tile, tl.load(x_ptr + tile).to(tl.bfloat16))

        n = 16
        gen = torch.Generator().manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen).bfloat16() for _ in range(2))
        x = torch.randn(n, n, generator=gen) * torch.logspace(-30, 30, n * n).view(n, n)
        x.view(-1)[:3] = torch.tensor([float("inf"), -float("inf"), 1 + 2**-8])  # 1 + 2**-8: a tie, rounds to 1
        got_dot, got_round = torch.empty(n, n), torch.empty(n, n, dtype=torch.bfloat16)
        probe[(1,)](a, b, got_dot, x, got_round, n)
        return torch.allclose(got_dot, a.float() @ b.float(), rtol=1e-5, atol=1e-5) and torch.equal(
            got_round, x.bfloat16()
        )
    except Exception:  # the interpreter changed: keep it to fp32
        return False


INTERPRET_BF16 = INTERPRET and _fix_interpreter_bf16()
DTYPES = [torch.float32, torch.bfloat16] if (not INTERPRET or INTERPRET_BF16) else [torch.float32]

needs_kernels = pytest.mark.skipif(
    not ((torch.cuda.is_available() and HAS_TRITON) or INTERPRET), reason="needs a CUDA GPU with Triton"
)
needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON), reason="needs a CUDA GPU with Triton")
big = pytest.mark.skipif(INTERPRET, reason="too large for the Triton interpreter")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; a NaN left in out (an unwritten, poisoned element) fails."""
    assert not out.isnan().any(), "unwritten (NaN-poisoned) or NaN output"
    if ref.numel() == 0:
        return 0.0
    return ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
