"""The expert-load tally: tokens routed to each logical expert since the last rebalance, summed over the ranks'
reports (RankStats.expert_load in each Pong), as the load EPLB places experts by."""

from __future__ import annotations

import torch


class ExpertLoad:
    def __init__(self, num_moe_layers: int, num_experts: int):
        self.shape = (num_moe_layers, num_experts)
        self.counted: torch.Tensor | None = None  # [L, E] float64; None = nothing reported since the last reset

    def add(self, load: list[list[int]]) -> None:
        """One rank's report: [layer][expert] tokens since its previous report."""
        if not load:
            return
        t = torch.tensor(load, dtype=torch.float64)
        self.counted = t if self.counted is None else self.counted + t

    def or_uniform(self) -> torch.Tensor:
        """[L, E]: the load counted, or the same for every expert when nothing was."""
        return self.counted if self.counted is not None else torch.ones(*self.shape)

    def reset(self) -> None:
        self.counted = None
