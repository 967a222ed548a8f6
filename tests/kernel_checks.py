"""What every Triton-kernel test file shares: where kernels can run, tolerances, and the poisoned-output error.

Kernel tests run on a CUDA GPU; without one they are skipped, or run on the CPU through Triton's interpreter when
TRITON_INTERPRET=1 and Triton is installed (fp32 and small shapes only: the interpreter's bf16 dot is wrong).
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
DTYPES = [torch.float32] if INTERPRET else [torch.float32, torch.bfloat16]

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
