"""MoE routing for one layer: softmax over the experts, top-k, optional renormalisation, the per-expert load
count and the logical -> physical slot choice, as one call.

`route_topk_reference` is the torch composition that `SparseMoE.route`, `ExpertParallel.forward` and
`ExpertMap.choose_slots` run today (about a dozen small kernels); `route_topk` runs the one-launch Triton kernel
(`triton_routing.py`) instead when `ops.use_triton(logits)` holds.

Arguments, all for one MoE layer (pass the layer's rows of the per-layer tables, e.g. `load[layer]`):
  logits [T, E] (fp32/bf16/fp16), top_k, renormalize,
  load_row [E] int64 (tokens routed to each logical expert; incremented in place by 1 per (token, k)),
  replica_count_row [E] int (>= 1), logical_to_physical_row [E, R] int (a logical expert's slots, -1 padded).
Returns slots [T, k] int64 (physical slots; token t's j-th expert e takes replica (t + j) % replica_count[e]) and
weights [T, k] float32 (the top-k softmax probabilities in descending order, renormalised to sum 1 if asked).
`num_valid` ([1] int on the device, optional): rows from it on are padding (a CUDA graph's batch): slot -1,
weight 0, not counted in the load, so they are never dispatched.
"""

from __future__ import annotations

import torch

from eep_hpc.kernels import ops


def route_topk_reference(
    logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    load_row: torch.Tensor,
    replica_count_row: torch.Tensor,
    logical_to_physical_row: torch.Tensor,
    weights_dtype: torch.dtype = torch.float32,
    num_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (slots [T, k] int64, weights [T, k] computed in fp32, returned in weights_dtype);
    load_row [E] += tokens per expert (valid rows only)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    T, k = ids.shape
    dev, count = ids.device, replica_count_row[ids]
    valid = torch.ones(T, dtype=torch.bool, device=dev) if num_valid is None else \
        torch.arange(T, device=dev) < num_valid.to(dev).reshape(())
    flat = ids[valid].reshape(-1)
    load_row.index_add_(0, flat, torch.ones_like(flat, dtype=load_row.dtype))
    pick = (torch.arange(T, device=dev)[:, None] + torch.arange(k, device=dev)) % count
    slots = torch.where(valid[:, None], logical_to_physical_row[ids, pick], -1)
    weights = torch.where(valid[:, None], weights, 0.0)
    return slots.to(torch.int64), weights.to(weights_dtype)


def route_topk(
    logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    load_row: torch.Tensor,
    replica_count_row: torch.Tensor,
    logical_to_physical_row: torch.Tensor,
    weights_dtype: torch.dtype = torch.float32,
    num_valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel on CUDA (one launch, no host sync, CUDA-graph capturable), else the reference."""
    args = (
        logits,
        top_k,
        renormalize,
        load_row,
        replica_count_row,
        logical_to_physical_row,
    )
    if ops.use_triton(logits):
        from eep_hpc.kernels.triton_routing import route_topk_triton

        return route_topk_triton(*args, weights_dtype=weights_dtype, num_valid=num_valid)
    return route_topk_reference(*args, weights_dtype=weights_dtype, num_valid=num_valid)
