"""Expert map of one epoch: which physical slot holds which logical expert, and who owns each slot.

Glossary: a *logical* expert is expert e of the checkpoint; a *physical slot* is a place on a rank holding one copy
(replica) of a logical expert's weights. Slots are numbered globally 0..S-1; epoch rank i owns the contiguous range
[slot_offsets[i], slot_offsets[i+1]). Tables are per MoE layer (layer = ordinal among MoE layers).

Example: 4 experts, 2 ranks with 3 slots each, expert 0 hot:
    physical_to_logical = [[0, 1, 2, 0, 3, 1]]   slot_offsets = [0, 3, 6]
    logical_to_physical[0] = [[0, 3], [1, 5], [2, -1], [4, -1]]   replica_count = [[2, 2, 1, 1]]
"""

from __future__ import annotations

import torch


class ExpertMap:
    def __init__(self, physical_to_logical: list[list[int]], slot_offsets: list[int], my_rank: int, num_experts: int,
                 device: torch.device | str = "cpu"):
        """Routing tables live on `device`, so choosing slots for a step's tokens never waits for the host."""
        p2l = torch.tensor(physical_to_logical, dtype=torch.long)  # [L, S]
        L, S = p2l.shape
        self.physical_to_logical = p2l
        self.slot_offsets = list(slot_offsets)
        self.num_ranks = len(slot_offsets) - 1
        self.local_start, self.local_end = slot_offsets[my_rank], slot_offsets[my_rank + 1]
        owner = torch.empty(S, dtype=torch.long)
        for r in range(self.num_ranks):
            owner[slot_offsets[r] : slot_offsets[r + 1]] = r
        self.slot_owner = owner.to(device)  # [S]
        counts = torch.zeros(L, num_experts, dtype=torch.long)
        for layer in range(L):
            counts[layer] = torch.bincount(p2l[layer], minlength=num_experts)
        if (counts == 0).any():
            raise ValueError("every logical expert needs at least one physical slot in every layer")
        self.replica_count = counts.to(device)  # [L, E]
        # as wide as any placement of S slots may need (S - E + 1 replicas of one expert), so that the table keeps
        # its shape across placements and a commit can update it in place (CUDA graphs captured it)
        l2p = torch.full((L, num_experts, S - num_experts + 1), -1, dtype=torch.long)
        for layer in range(L):
            seen = [0] * num_experts
            for slot, e in enumerate(p2l[layer].tolist()):
                l2p[layer, e, seen[e]] = slot
                seen[e] += 1
        self.logical_to_physical = l2p.to(device)  # [L, E, max_replicas]

    @property
    def num_local_slots(self) -> int:
        return self.local_end - self.local_start

    def local_logical(self, layer: int) -> list[int]:
        return self.physical_to_logical[layer, self.local_start : self.local_end].tolist()

    def choose_slots(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T, k] logical -> [T, k] physical slots, spreading tokens over an expert's replicas."""
        T, k = topk_ids.shape
        dev = self.replica_count.device
        ids = topk_ids.to(dev)
        count = self.replica_count[layer][ids]  # [T, k]
        pick = (torch.arange(T, device=dev)[:, None] + torch.arange(k, device=dev)[None, :]) % count
        return self.logical_to_physical[layer][ids, pick]
