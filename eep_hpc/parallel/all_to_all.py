"""MoE dispatch/combine between the ranks of an epoch, behind one interface.

dispatch: each (token, k) pair goes to the rank owning its chosen physical slot; a rank receives rows for its local
slots. combine: expert outputs go back to the token's rank and are summed over k in a fixed order (k = 0, 1, ...),
so a token's result does not depend on which rank or replica computed each expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from eep_hpc.parallel.groups import EpochGroup


@dataclass
class DispatchHandle:
    order: torch.Tensor | None  # [N] pair index (t * k + j) of each sent row, grouped by destination (None: 1 rank)
    send_counts: list[int]
    recv_counts: list[int]
    num_tokens: int
    top_k: int


class AllToAll(Protocol):
    def dispatch(
        self, x: torch.Tensor, slots: torch.Tensor, slot_owner: torch.Tensor, local_start: torch.Tensor | int
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchHandle]:
        """x [T, D], slots [T, k] physical -> (rows [R, D], local slot of each received pair [M], handle); pair m
        reads row m // (M / R): one row per pair after an exchange, one row per token's k pairs when all are local."""
        ...

    def combine(self, y: torch.Tensor, weights: torch.Tensor, handle: DispatchHandle) -> torch.Tensor:
        """y [M, D] expert outputs of the received rows, weights [T, k] -> [T, D]."""
        ...


class TorchAllToAll:
    """all_to_all_single over the epoch's device group (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, group: EpochGroup):
        self.group = group

    @property
    def graph_safe(self) -> bool:
        """One rank exchanges nothing and never syncs with the host: its steps can be CUDA graphs."""
        return self.group.size == 1

    def dispatch(self, x, slots, slot_owner, local_start):
        T, k = slots.shape
        if self.group.size == 1:  # every slot is local: pairs in (t, j) order share their token's row of x
            local = slots.reshape(-1)
            if not (isinstance(local_start, int) and local_start == 0):
                local = local - local_start
            return x, local, DispatchHandle(None, [], [], T, k)
        owners = slot_owner[slots.reshape(-1)]  # [T*k] destination rank of each pair
        order = torch.argsort(owners, stable=True)
        send_counts = torch.bincount(owners, minlength=self.group.size).tolist()  # the one host sync per layer
        recv_counts = self.group.all_to_all_counts(send_counts)
        M = sum(recv_counts)
        send_rows = x[(order // k).to(x.device)]
        rows = x.new_empty(M, x.shape[1])
        self.group.all_to_all(rows, send_rows, recv_counts, send_counts)
        send_slots = slots.reshape(-1)[order].to(x.device)
        recv_slots = torch.empty(M, dtype=torch.long, device=x.device)
        self.group.all_to_all(recv_slots, send_slots, recv_counts, send_counts)
        handle = DispatchHandle(order, send_counts, recv_counts, T, k)
        return rows, recv_slots - local_start, handle

    def combine(self, y, weights, handle):
        T, k = handle.num_tokens, handle.top_k
        if handle.order is None:
            pairs = y.view(T, k, y.shape[1])
        else:
            back = y.new_empty(sum(handle.send_counts), y.shape[1])
            self.group.all_to_all(back, y, handle.send_counts, handle.recv_counts)
            pairs = y.new_empty(T * k, y.shape[1])
            pairs[handle.order] = back
            pairs = pairs.view(T, k, y.shape[1])
        return weighted_sum(pairs, weights)


def weighted_sum(pairs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """pairs [T, k, D], weights [T, k] -> [T, D]: one batched matmul (fp32 accumulation on the GPU); the sum
    depends only on the values, not on which rank computed them."""
    return torch.bmm(weights.to(pairs.dtype).unsqueeze(1), pairs).squeeze(1)


def make_all_to_all(cfg, arch, epoch, group: EpochGroup, expert_map) -> AllToAll:
    """The backend cfg.parallel.backend names, for one epoch (`epoch` is the P.Epoch entered, `arch` the model's
    MoEArch): "torch" (CPU and GPU, the default) or "nixl_ep" (CUDA; a config error elsewhere)."""
    if cfg.parallel.backend == "nixl_ep":
        from eep_hpc.parallel.nixl_ep_all_to_all import NixlEpAllToAll

        return NixlEpAllToAll.for_epoch(cfg, arch, epoch, group, expert_map)
    return TorchAllToAll(group)
