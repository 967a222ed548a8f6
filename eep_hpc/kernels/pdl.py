"""Programmatic dependent launch (PDL, Hopper and later) for the kernels of a decode step.

A batch-1 decode step is ~500 small kernels in a row, and each one pays its launch, the scheduling of its
programs and its first loads' latency after the one before it has drained (about 2 us each on an H100, a third of
the step). With PDL a kernel may start while the one before it is still finishing: every kernel here, launched
with `launch_pdl`, first waits for the kernel before it to complete and flush its writes (`gdc_wait`), then lets
the next kernel launch (`gdc_launch_dependents`: it fires once every program of this kernel has passed it, so the
next kernel is launched and its programs placed while this one computes, one kernel ahead, never more). The wait
comes first thing in every program, before any early return, so a kernel completes only after the one before it
did: "complete" stays transitive down the chain, and a kernel may read what any earlier kernel wrote. Kernels
launched without PDL (torch's, and ours where it is off) wait for their predecessor as always.

On by default (H100, batch-1 decode step 3.42 -> 3.26 ms, the same greedy tokens with and without: tests/kernels/
test_pdl.py); `EEP_HPC_PDL=0` launches without it (read at each launch: a benchmark compares both in one process; a
captured CUDA graph keeps what it captured).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


PDL_DEFAULT = "1"


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


@functools.cache
def _triton_supports_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait") and "launch_pdl" in CUDAOptions.__dataclass_fields__


def use_pdl(t: torch.Tensor) -> bool:
    """Launch the kernels that compute on t with PDL: a Hopper-or-later GPU, a Triton that has it, not switched off."""
    if not t.is_cuda or os.environ.get("EEP_HPC_PDL", PDL_DEFAULT) == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _device_supports_pdl(index) and _triton_supports_pdl()


def pdl_args(t: torch.Tensor) -> dict:
    """The launch keywords of a kernel that begins with `pdl_start(USE_PDL)`."""
    return {"USE_PDL": True, "launch_pdl": True} if use_pdl(t) else {"USE_PDL": False}


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """First thing in a kernel launched with PDL: wait for the one before, then let the next kernel launch."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
