"""Runs the model for one scheduled batch on one rank: owns the KV cache tensors and the step's input tensors.

GPU specifics (CUDA graphs, Triton kernels) plug in here and in kernels/; the scheduler never sees them.
"""

from __future__ import annotations

import torch

from eep_hpc.kernels.attention import AttentionMetadata
from eep_hpc.model.decoder import MoEForCausalLM
from eep_hpc.model.moe import ExpertParallel


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, num_kv_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
        self.model, self.device, self.block_size = model, device, block_size
        self.num_kv_blocks = num_kv_blocks
        self.kv_caches = model.make_kv_caches(num_kv_blocks, block_size, dtype, device)

    def forward(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        ep: ExpertParallel,
    ) -> torch.Tensor:
        """Packed new tokens of B sequences -> hidden states [T, D]."""
        meta = AttentionMetadata.build(slot_mapping, query_lens, seq_lens, block_tables, self.block_size, self.device)
        ids = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self.model(ids, pos, self.kv_caches, meta, ep)

    def run(self, batch, block_manager, ep: ExpertParallel) -> tuple[torch.Tensor, list[int]]:
        """batch: scheduled (seq, num_new_tokens) pairs -> (logits [N, V] of the sequences that sample, their
        indices in the batch). A sequence samples when this step reaches the end of its known tokens."""
        input_ids, positions, slots, qlens, seq_lens, tables, last_rows, sampling = [], [], [], [], [], [], [], []
        for i, (seq, n) in enumerate(batch):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            input_ids += seq.token_ids[start:end]
            positions += range(start, end)
            slots += block_manager.slot_mapping(seq, start, end)
            qlens.append(n)
            seq_lens.append(end)
            tables.append(seq.block_table)
            if end == seq.num_tokens:
                last_rows.append(len(input_ids) - 1)
                sampling.append(i)
        hidden = self.forward(input_ids, positions, slots, qlens, seq_lens, tables, ep)
        idx = torch.tensor(last_rows, dtype=torch.long, device=self.device)
        return self.model.compute_logits(hidden[idx]), sampling
