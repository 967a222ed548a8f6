"""Runs the model for one scheduled batch on one rank: owns the KV cache tensors and the step's input tensors.

GPU specifics (CUDA graphs, Triton kernels) plug in here and in kernels/; the scheduler never sees them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from eep_hpc.engine.cuda_graphs import StepGraphs
from eep_hpc.engine.device_lists import device_tensor
from eep_hpc.kernels.attention import AttentionMetadata
from eep_hpc.model.decoder import MoEForCausalLM
from eep_hpc.model.moe import ExpertParallel
from eep_hpc.parallel.all_to_all import graph_standin
from eep_hpc.parallel.step_plan import GraphSizes, StepPlan


class ModelRunner:
    def __init__(self, model: MoEForCausalLM, num_kv_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, graph_max_batch: int = 0, max_model_len: int = 0, graph_max_tokens: int = 0):
        """On CUDA, graph_max_batch > 0: decode steps of up to that many sequences replay CUDA graphs, and
        graph_max_tokens > 0: so do other steps of up to that many tokens (mixed graphs)."""
        self.model, self.device, self.block_size = model, device, block_size
        self.num_kv_blocks, self.max_model_len = num_kv_blocks, max_model_len
        self.kv_caches = model.make_kv_caches(num_kv_blocks, block_size, dtype, device)
        self.graphs = None
        if graph_max_batch > 0 and (device.type == "cuda" or graph_standin(device)):
            self.graphs = StepGraphs(model, self.kv_caches, block_size, graph_max_batch,
                                     -(-max_model_len // block_size), device, graph_max_tokens)

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

    def warmup(self, max_tokens: int, ep: ExpertParallel, chunk_tokens: int = 0) -> None:
        """Compile the kernels of prefills before serving (Triton JITs each new tile config on first use):
        max_tokens in sequences of at most max_model_len, 4 of 64, and one prefill per MoE tile class. Nothing is
        written to the cache (slot -1). Collective under EP: every member of the epoch calls it."""
        load = ep.load.clone()  # not real traffic
        longest = min(max_tokens, self.max_model_len or max_tokens)
        shapes = [(max(1, max_tokens // longest), longest), (4, 64)]
        # one prefill in each tile class of the MoE kernels (by rows per local slot: kernels/triton_moe.pick_config,
        # and the grouped GEMM from ops.GROUPED_MIN_ROWS_PER_SLOT), or its first real batch compiles mid-serving
        # (counted against the logical experts, not this rank's slots: every member must run the same shapes)
        arch = self.model.arch
        if self.model.moe_blocks():
            for rows_per_slot in (2, 16, 48, 96, 256):
                n = min(max_tokens, -(-rows_per_slot * arch.num_experts // arch.top_k))
                seqs = -(-n // longest)
                shapes.append((seqs, -(-n // seqs)))
        for seqs, n in dict.fromkeys(shapes):
            width = -(-n // self.block_size)
            cap = chunk_tokens or seqs * n
            ep.plan(chunks=-(-seqs * n // cap), chunk_tokens=cap)
            self.forward([0] * (seqs * n), list(range(n)) * seqs, [-1] * (seqs * n), [n] * seqs, [n] * seqs,
                         [[0] * width] * seqs, ep)
        ep.load.copy_(load)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def graph_sizes(self, ep: ExpertParallel, max_tokens: int = 0) -> GraphSizes:
        return self.graphs.sizes_for(ep, max_tokens) if self.graphs is not None else GraphSizes()

    def missing_graphs(self, ep: ExpertParallel, max_tokens: int = 0) -> tuple[int, ...]:
        """Per graph of `graph_sizes` (decode, then mixed): 1 where this rank has not captured it."""
        return self.graphs.missing(self.graph_sizes(ep, max_tokens), ep) if self.graphs is not None else ()

    def graphable(self, batch, ep: ExpertParallel) -> bool:
        """Can this batch of (seq, num_new_tokens) run as a decode graph: one new token each, no prompt logprobs
        rows, not more sequences than the largest graph (an empty batch can: an idle rank replays)."""
        if not self.graph_sizes(ep).decode or len(batch) > self.graphs.max_batch:
            return False
        return all(n == 1 and not (seq.wants_prompt_logprobs and seq.num_computed_tokens < seq.num_prompt_tokens - 1)
                   for seq, n in batch)

    def run(self, batch, block_manager, ep: ExpertParallel, plan: StepPlan) -> StepLogits:
        """batch: scheduled (seq, num_new_tokens) pairs, run as `plan` says (a graph of the agreed size, or eagerly
        with the agreed MoE chunks) -> logits of the sequences that sample (this step reaches
        the end of their known tokens) and, for sequences that asked for prompt logprobs, of their chunk's rows
        that predict a prompt token. Only those rows go through the LM head."""
        input_ids, positions, slots, qlens, seq_lens, tables, last_rows, sampling = [], [], [], [], [], [], [], []
        prompt_rows: list[int] = []
        prompt_chunks: list[tuple[int, int, int]] = []  # (batch index, first position, rows)
        for i, (seq, n) in enumerate(batch):
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
            first_row = len(input_ids)
            input_ids += seq.token_slice(start, end)
            positions += range(start, end)
            slots += block_manager.slot_mapping(seq, start, end)
            qlens.append(n)
            seq_lens.append(end)
            tables.append(seq.block_table)
            if end == seq.num_tokens:
                last_rows.append(len(input_ids) - 1)
                sampling.append(i)
            if seq.wants_prompt_logprobs:
                # row of position p predicts token p + 1: prompt tokens up to the last one
                rows = min(end, seq.num_prompt_tokens - 1) - start
                if rows > 0:
                    prompt_rows += range(first_row, first_row + rows)
                    prompt_chunks.append((i, start, rows))
        if plan.is_graph:
            hidden = self.graphs.run(input_ids, positions, slots, qlens, seq_lens, tables, ep, plan.graph_size,
                                     plan.mixed, capture_round=plan.capture)
        else:
            ep.plan(chunks=plan.chunks, chunk_tokens=plan.chunk_tokens)
            hidden = self.forward(input_ids, positions, slots, qlens, seq_lens, tables, ep)
        if not prompt_rows and len(last_rows) == hidden.shape[0]:  # every row samples (a decode step): no gather
            logits = self.model.compute_logits(hidden)  # [N, V]
        else:  # [N + prompt rows, V]
            logits = self.model.compute_logits(hidden[device_tensor(last_rows + prompt_rows, torch.long, self.device)])
        prompt, offset = [], len(last_rows)
        for i, start, rows in prompt_chunks:
            prompt.append((i, start, logits[offset : offset + rows]))
            offset += rows
        return StepLogits(logits[: len(last_rows)], sampling, prompt)


class StepLogits(NamedTuple):
    sample: torch.Tensor  # [N, V] float32, rows of the sequences that sample
    sample_index: list[int]  # their indices in the batch
    # (batch index, first position, [rows, V] logits of positions first .. first + rows - 1) per sequence that
    # wants prompt logprobs; row j predicts prompt token first + j + 1.
    prompt: list[tuple[int, int, torch.Tensor]]
