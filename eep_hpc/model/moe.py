"""The sparse MoE block and the expert-parallel context its layers share.

A rank holds only its own physical slots (`w13` [S_local, 2I, D], `w2` [S_local, D, I]; fp8 slots also hold their
block scales `w13_scale`, `w2_scale`, slot first, see kernels/fp8.py); the router runs on every rank for its own
tokens, and `ExpertParallel` moves (token, expert) pairs to the slot owners and back. Swapping
epochs or placements replaces `ExpertParallel` and the slot tensors between steps; the layer code never changes.
"""

from __future__ import annotations

import torch
from torch import nn

from eep_hpc.kernels.fp8 import FP8, BlockScales, expert_scale_shapes
from eep_hpc.kernels.routing import route_topk
from eep_hpc.model.layers import Linear
from eep_hpc.parallel.all_to_all import AllToAll
from eep_hpc.parallel.expert_map import ExpertMap


class ExpertParallel:
    def __init__(self, expert_map: ExpertMap, all_to_all: AllToAll, num_experts: int):
        self.map = expert_map
        self.all_to_all = all_to_all
        L = expert_map.physical_to_logical.shape[0]
        # tokens routed per logical expert since the last take, counted on the device (no sync per layer)
        self.load = torch.zeros(L, num_experts, dtype=torch.long, device=expert_map.slot_owner.device)
        # the step's plan (parallel/step_plan.py), set before each forward: the MoE runs in `chunks` dispatches of
        # at most `chunk_tokens` tokens (0: all in one); in a graph, `num_valid` ([1] on the device) says where
        # the padding rows start
        self.chunks, self.chunk_tokens = 1, 0
        self.num_valid: torch.Tensor | None = None
        # the router picks what the backend dispatches by (physical slots, or nixl_ep's expert ids): the mapping
        # is applied to the slot table once per epoch, not to every layer's picks
        self.route_table = all_to_all.to_destinations(expert_map.logical_to_physical)
        self.weights_dtype = all_to_all.weights_dtype

    @property
    def graph_safe(self) -> bool:
        return bool(getattr(self.all_to_all, "graph_safe", False))

    def can_replace(self, old: ExpertParallel) -> bool:
        """Can this epoch's steps run through `old`'s CUDA graphs once `adopt_tensors(old)` gave it old's device
        tensors: the same communication memory and kernels (the backend's `graph_key`) and tables of the same
        shapes. The slots a rank owns may differ (a grow or a shrink moves its range; its slot tensors stay, see
        rank/epochs.py): what a graph reads of them is in the tables."""
        key = getattr(self.all_to_all, "graph_key", None)
        m, o = self.map, old.map
        return (key is not None and key == getattr(old.all_to_all, "graph_key", None)
                and all(getattr(m, n).shape == getattr(o, n).shape for n in ("replica_count", "logical_to_physical",
                                                                             "slot_owner"))
                and self.route_table.shape == old.route_table.shape and self.route_table.dtype == old.route_table.dtype)

    def adopt_tensors(self, old: ExpertParallel) -> None:
        """Write this epoch's tables into `old`'s device tensors and use those from now on (what old's CUDA graphs
        read); the load counted so far carries on (it is per logical expert, whatever the placement)."""
        for name in ("replica_count", "logical_to_physical", "slot_owner"):
            mine = getattr(old.map, name).copy_(getattr(self.map, name))
            setattr(self.map, name, mine)
        self.route_table = old.route_table.copy_(self.route_table)
        self.load = old.load
        adopt = getattr(self.all_to_all, "adopt_tensors", None)
        if adopt is not None:
            adopt(old.all_to_all)

    def plan(self, chunks: int = 1, chunk_tokens: int = 0, num_valid: torch.Tensor | None = None) -> None:
        self.chunks, self.chunk_tokens, self.num_valid = chunks, chunk_tokens, num_valid

    def take_load(self) -> torch.Tensor:
        load = self.load.to("cpu", copy=True)  # then zeroed in place: CUDA graphs captured this tensor
        self.load.zero_()
        return load

    def forward(self, layer: int, x, topk_ids, topk_weights, w13, w2, scales: BlockScales | None = None):
        """x [T, D] with its routing (topk_ids [T, k] logical experts, topk_weights [T, k]) -> [T, D]."""
        slots = self.map.choose_slots(layer, topk_ids)
        ones = torch.ones_like(topk_ids)
        if self.num_valid is not None:  # a graph's padding rows: not dispatched, not counted
            valid = torch.arange(x.shape[0], device=slots.device)[:, None] < self.num_valid
            slots, ones = torch.where(valid, slots, -1), ones * valid
        self.load[layer].index_add_(0, topk_ids.reshape(-1), ones.reshape(-1))
        dests = self.all_to_all.to_destinations(slots)
        return self.experts(x, dests, topk_weights.to(self.weights_dtype or x.dtype), w13, w2, scales)

    def forward_softmax_topk(self, layer: int, x, gate_logits, top_k: int, renormalize: bool, w13, w2,
                             scales: BlockScales | None = None):
        """`forward` after softmax top-k routing of gate_logits [T, E]; the routing, the load count and the
        choice of replicas are one fused op on the GPU."""
        m = self.map
        dests, weights = route_topk(gate_logits, top_k, renormalize, self.load[layer], m.replica_count[layer],
                                    self.route_table[layer], weights_dtype=self.weights_dtype or x.dtype,
                                    num_valid=self.num_valid)
        return self.experts(x, dests, weights, w13, w2, scales)

    def experts(self, x, slots, weights, w13, w2, scales: BlockScales | None):
        """x [T, D] through the destinations [T, k] (the backend's `to_destinations` of physical slots; -1: not
        sent) wherever they live, summed with weights [T, k]; in the step's agreed number of dispatches (every
        rank makes the same number, some of them empty)."""
        cap = self.chunk_tokens or x.shape[0]
        if self.chunks == 1:
            return self._experts(x, slots, weights, w13, w2, scales, max(cap, x.shape[0]))
        if x.shape[0] > self.chunks * cap:
            raise ValueError(f"{x.shape[0]} tokens do not fit {self.chunks} MoE chunks of {cap}")
        pieces = [self._experts(x[i : i + cap], slots[i : i + cap], weights[i : i + cap], w13, w2, scales, cap)
                  for i in range(0, self.chunks * cap, cap)]
        return torch.cat(pieces)

    def _experts(self, x, slots, weights, w13, w2, scales, capacity: int):
        a2a = self.all_to_all
        rows, local_slot, handle = a2a.dispatch(x, slots, self.map.slot_owner, self.map.local_start, capacity)
        return a2a.experts_combined(rows, local_slot, weights, w13, w2, scales, handle)


class SparseMoE(nn.Module):
    def __init__(self, hidden: int, intermediate: int, num_experts: int, top_k: int, renormalize: bool, moe_index: int,
                 num_local_slots: int, fp8_block: tuple[int, int] | None = None):
        """fp8_block: expert slots in fp8 with scales of that block (buffers: they travel with the slots, never
        with the dense weights); None: in the default dtype."""
        super().__init__()
        self.gate = Linear(hidden, num_experts, bias=False)  # ops.linear: the skinny GEMM at decode
        self.top_k, self.renormalize, self.moe_index = top_k, renormalize, moe_index
        S, dtype = num_local_slots, (FP8 if fp8_block else None)
        self.w13 = nn.Parameter(torch.empty(S, 2 * intermediate, hidden, dtype=dtype), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(S, hidden, intermediate, dtype=dtype), requires_grad=False)
        self.fp8_block = fp8_block
        s13, s2 = expert_scale_shapes(intermediate, hidden, fp8_block) if fp8_block else (None, None)
        self.register_buffer("w13_scale", torch.empty(S, *s13, dtype=torch.float32) if s13 else None, persistent=False)
        self.register_buffer("w2_scale", torch.empty(S, *s2, dtype=torch.float32) if s2 else None, persistent=False)

    def scales(self) -> BlockScales | None:
        return None if self.fp8_block is None else BlockScales(self.w13_scale, self.w2_scale, self.fp8_block)

    def forward(self, x: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
        return self.forward_routed(x, self.gate(x), ep)

    def forward_routed(self, x: torch.Tensor, gate_logits: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
        """After the router's projection: softmax over all experts in fp32, top-k, optional renormalisation
        (kernels/routing.py), experts."""
        return ep.forward_softmax_topk(self.moe_index, x, gate_logits, self.top_k, self.renormalize, self.w13,
                                       self.w2, self.scales())
