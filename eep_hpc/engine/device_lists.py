"""Python lists onto the device without making the host wait for the GPU.

`torch.tensor(values, device="cuda")` copies from pageable memory and then synchronises the stream: in the middle
of a step (after the graph replay, between the LM head and the sampler) that makes the host wait for all the work
queued so far, and the GPU then waits for the host's next launches. Through pinned memory with `non_blocking`, the
copy is queued behind that work instead (torch's pinned-memory cache keeps the staging block until the copy ran),
so a decode step reads the GPU back once, for its tokens.
"""

from __future__ import annotations

import torch


def device_tensor(values, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """values (a list, or nested lists) as a tensor on `device`, queued on the current stream (no host sync)."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor onto `device` the same way."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
