"""MoE dispatch/combine between the ranks of an epoch, behind one interface.

dispatch: each (token, k) pair goes to the rank owning its chosen physical slot; a rank receives rows for its local
slots. combine: expert outputs go back to the token's rank and are summed over k in a fixed order (k = 0, 1, ...),
so a token's result does not depend on which rank or replica computed each expert.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch

from eep_hpc.kernels import ops
from eep_hpc.parallel.groups import EpochGroup


@dataclass
class DispatchHandle:
    dest: torch.Tensor | None  # [T*k] row of each pair in the fixed-size send buffer (padding: R * C), None: 1 rank
    capacity: int  # C: pair rows per destination rank
    num_tokens: int
    top_k: int


class AllToAll(Protocol):
    graph_safe: bool  # a CUDA graph can capture dispatch and combine (no host sync, no host collective)
    graph_key: tuple | None  # equal across epochs whose communication a captured graph serves alike (None: none)
    weights_dtype: torch.dtype | None  # what combine wants the top-k weights in (None: the activations' dtype)

    def to_destinations(self, slots: torch.Tensor) -> torch.Tensor:
        """Physical slots (any shape, -1 kept) -> what dispatch routes by; applied once per epoch to the router's
        slot table."""
        ...

    def dispatch(
        self, x: torch.Tensor, slots: torch.Tensor, slot_owner: torch.Tensor, local_start: int, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """x [T, D], slots [T, k] physical (-1: padding, not sent); capacity: the most tokens any rank of the epoch
        sends in this dispatch (agreed for the step, the same on all) -> (rows [R, D], local slot of each received
        pair [M] (negative: padding), handle); pair m reads row m // (M / R): one row per pair after an exchange,
        one row per token's k pairs when all are local. No host sync, no host collective."""
        ...

    def run_experts(self, rows, local_slot, w13, w2, scales, handle) -> torch.Tensor:
        """The local experts over what dispatch received, in the layout combine reads."""
        ...

    def combine(self, y: torch.Tensor, weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """y [M, D] expert outputs of the received rows, weights [T, k] -> [T, D]."""
        ...

    def experts_combined(self, rows, local_slot, weights, w13, w2, scales, handle) -> torch.Tensor:
        """`combine(run_experts(...), weights, handle)`, in fewer passes where the backend can fuse them."""
        ...


def graph_standin(device: torch.device) -> bool:
    """EEP_HPC_GRAPH_STANDIN=1 on the CPU: steps go through the CUDA-graph path (engine/cuda_graphs.py) with an
    eager forward of the padded batch for each replay and for each capture's warm-up, in every epoch: the agreed
    graph sizes, the capture rounds and the graphs kept or dropped at a commit run, exchanges included, without a
    GPU (tests)."""
    return device.type == "cpu" and os.environ.get("EEP_HPC_GRAPH_STANDIN") == "1"


class TorchAllToAll:
    """all_to_all_single over the epoch's device group (gloo on CPU, NCCL on CUDA), in buffers of a fixed size: every
    rank sends every other `capacity * k` pair rows (padding rows carry slot -1), so nobody has to learn first how
    many rows are coming: no count exchange and no host sync per layer, at the price of moving padding. It is the
    CPU path and the GPU fallback; on GPUs nixl_ep sends only real rows."""

    weights_dtype = None

    def __init__(self, group: EpochGroup):
        self.group = group

    def to_destinations(self, slots: torch.Tensor) -> torch.Tensor:
        return slots  # the physical slots themselves

    @property
    def graph_safe(self) -> bool:
        """One rank exchanges nothing: its steps can be CUDA graphs. (NCCL inside graphs is not tried yet.) On the
        CPU's graph stand-in every epoch can: its exchange has a fixed size per agreed step size."""
        return self.group.size == 1 or graph_standin(self.group.device)

    @property
    def graph_key(self) -> tuple | None:
        """Equal for two epochs whose steps a CUDA graph of one can run for the other (None: never)."""
        if self.group.size == 1:
            return ("one rank",)
        return ("all_to_all_single, stand-in",) if graph_standin(self.group.device) else None

    def dispatch(self, x, slots, slot_owner, local_start, capacity):
        T, k = slots.shape
        flat = slots.reshape(-1)
        if self.group.size == 1:  # every slot is local: pairs in (t, j) order share their token's row of x
            local = flat if local_start == 0 else torch.where(flat >= 0, flat - local_start, -1)
            return x, local, DispatchHandle(None, 0, T, k)
        R, C, D = self.group.size, max(capacity, T) * k, x.shape[1]
        valid = flat >= 0
        owner = torch.where(valid, slot_owner[flat.clamp_min(0)], R)  # R: sent nowhere
        onehot = torch.nn.functional.one_hot(owner, R + 1)
        before = (onehot.cumsum(0) - onehot).gather(1, owner[:, None]).squeeze(1)  # earlier pairs, same owner
        dest = torch.where(valid, owner * C + before, R * C)
        send_rows = x.new_zeros(R * C + 1, D)
        send_rows.index_copy_(0, dest, x.repeat_interleave(k, dim=0) if T else x.new_zeros(0, D))
        send_slots = torch.full((R * C + 1,), -1, dtype=torch.long, device=x.device)
        send_slots.index_copy_(0, dest, flat)
        rows = x.new_empty(R * C, D)
        recv_slots = torch.empty(R * C, dtype=torch.long, device=x.device)
        self.group.all_to_all(rows, send_rows[: R * C], [C] * R, [C] * R)
        self.group.all_to_all(recv_slots, send_slots[: R * C], [C] * R, [C] * R)
        local = torch.where(recv_slots >= 0, recv_slots - local_start, -1)
        return rows, local, DispatchHandle(dest, C, T, k)

    def run_experts(self, rows, local_slot, w13, w2, scales, handle):
        return ops.swiglu_experts(rows, local_slot, w13, w2, scales)

    def combine(self, y, weights, handle):
        T, k, D = handle.num_tokens, handle.top_k, y.shape[1]
        if handle.dest is None:
            pairs = y.view(T, k, D)
        else:
            R, C = self.group.size, handle.capacity
            back = y.new_zeros(R * C + 1, D)  # the last row: where padding pairs read their zero
            self.group.all_to_all(back[: R * C], y, [C] * R, [C] * R)
            pairs = back.index_select(0, handle.dest).view(T, k, D)
        return weighted_sum(pairs, weights)

    def experts_combined(self, rows, local_slot, weights, w13, w2, scales, handle):
        if handle.dest is None:  # one rank: the experts and the weighted sum with nothing between them
            return ops.swiglu_experts_combined(rows, local_slot, weights.to(rows.dtype), w13, w2, scales)
        return self.combine(self.run_experts(rows, local_slot, w13, w2, scales, handle), weights, handle)


def weighted_sum(pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """pairs [T, k, D], weights [T, k] -> [T, D] (fp32 accumulation on the GPU); the sum depends only on the
    values, not on which rank computed them."""
    return ops.weighted_sum(pairs, weights.to(pairs.dtype))
