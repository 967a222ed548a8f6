"""CUDA graphs for decode steps: one graph per padded batch size, replayed instead of ~20 kernel launches per layer.

A decode step (every sequence brings one new token, no prompt logprobs) of B sequences runs the graph of the size
the step's plan agreed (parallel/step_plan.py: the smallest captured size >= the largest B of any rank; an idle
rank replays it with B = 0). Inputs go into static buffers the graphs were captured with; the padding sequences
have seq_len 0 and slot -1, so they write no KV and read nothing (kernels/NOTES.md lists what the kernels need),
and the router gives their rows no expert (`num_valid`), so they are never dispatched nor counted as load.

A graph bakes in the tensors it saw: the expert weights and the `ExpertParallel` of its epoch. Commit swaps both,
so graphs are dropped when the runner sees another `ExpertParallel` and re-captured on first use. Every rank of an
epoch captures the same sizes in the same order (at startup all of them; after a commit each size at the step
that first agrees on it), since a capture's warm-up runs the epoch's collectives. Only an epoch whose all-to-all
is graph-safe (no host sync, no host collective: one rank, or nixl_ep) runs graphs; others run eagerly.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from eep_hpc.kernels.attention import AttentionMetadata
from eep_hpc.model.moe import ExpertParallel

log = logging.getLogger("eep_hpc.cuda_graphs")


def capture_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch (and max_batch itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class DecodeGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.sizes = capture_sizes(max_batch)
        self.max_batch, self.width = self.sizes[-1], max(1, max_blocks_per_seq)
        B, W = self.max_batch, self.width
        # one flat int64 buffer, same layout on host (pinned) and device, copied in one go per step:
        # [input_ids B | positions B | slot_mapping B | query_start_loc B+1 | seq_lens B | block_tables B*W |
        #  num_valid 1]
        self.offsets = np.cumsum([0, B, B, B, B + 1, B, B * W, 1])
        self.host = torch.zeros(int(self.offsets[-1]), dtype=torch.long).pin_memory()
        self.host_np = self.host.numpy()
        self.static = torch.zeros_like(self.host, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.ep: ExpertParallel | None = None
        self.replays = 0

    def _region(self, buf, i: int):
        return buf[self.offsets[i] : self.offsets[i + 1]]

    def sizes_for(self, ep: ExpertParallel) -> list[int]:
        """The graph sizes this epoch can replay (none when its all-to-all is not capturable)."""
        return self.sizes if ep.graph_safe else []

    def _fill(self, input_ids, positions, slot_mapping, seq_lens, block_tables, size: int) -> None:
        """Write a batch of B <= size sequences and its padding into the host buffer."""
        B, h, W = len(input_ids), self.host_np, self.width
        ids, pos, slots, qsl, lens, tables, num_valid = (self._region(h, i) for i in range(7))
        num_valid[0] = B
        ids[:B], pos[:B], slots[:B], lens[:B] = input_ids, positions, slot_mapping, seq_lens
        ids[B:size] = 0
        pos[B:size] = 0
        slots[B:size] = -1
        lens[B:size] = 0
        qsl[: size + 1] = np.arange(size + 1)
        tables = tables.reshape(self.max_batch, W)
        for b, t in enumerate(block_tables):
            tables[b, : len(t)] = t

    def _meta(self, size: int) -> AttentionMetadata:
        s = self.static
        qsl, lens = self._region(s, 3)[: size + 1], self._region(s, 4)[:size]
        tables = self._region(s, 5).view(self.max_batch, self.width)[:size]
        cpu_lens = torch.zeros(size, dtype=torch.long)
        return AttentionMetadata(
            slot_mapping=self._region(s, 2)[:size], query_start_loc=torch.arange(size + 1), seq_lens=cpu_lens,
            block_tables=tables, block_size=self.block_size, query_start_loc_device=qsl, seq_lens_device=lens,
            max_query_len=1, max_seq_len=self.width * self.block_size,
            block_tables_host=torch.zeros(size, self.width, dtype=torch.long),  # (the torch reference's; unused)
        )

    def _forward(self, size: int, ep: ExpertParallel) -> torch.Tensor:
        s = self.static
        ep.plan(chunks=1, chunk_tokens=size, num_valid=self._region(s, 6))
        return self.model(self._region(s, 0)[:size], self._region(s, 1)[:size], self.kv_caches, self._meta(size), ep)

    def _capture(self, size: int, ep: ExpertParallel) -> None:
        t0 = time.monotonic()
        self._fill([], [], [], [], [], size)
        self.static.copy_(self.host)
        self._forward(size, ep)  # compiles the kernels of this size outside the capture
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._forward(size, ep)
        torch.cuda.synchronize(self.device)
        self.graphs[size] = (graph, out)
        log.debug("captured decode graph for %d sequences in %.2f s", size, time.monotonic() - t0)

    def capture_all(self, ep: ExpertParallel) -> None:
        """Capture every size now (largest first, so smaller graphs reuse its pool), e.g. at startup; every rank of
        a multi-rank epoch together."""
        if not ep.graph_safe:
            return
        t0 = time.monotonic()
        self._use(ep)
        for size in reversed(self.sizes):
            if size not in self.graphs:
                self._capture(size, ep)
        log.info("captured %d decode CUDA graphs (batch sizes %d..%d) in %.1f s", len(self.sizes), self.sizes[0],
                 self.sizes[-1], time.monotonic() - t0)

    def _use(self, ep: ExpertParallel) -> None:
        if ep is not self.ep:
            self.reset()
            self.ep = ep

    def reset(self) -> None:
        """Drop every graph: they hold the previous epoch's expert tensors and maps (memory a new epoch needs).
        Their pool goes with them; a handle whose graphs are all gone must not be captured into again."""
        self.graphs.clear()
        self.pool, self.ep = None, None

    def run(self, input_ids, positions, slot_mapping, seq_lens, block_tables, ep: ExpertParallel,
            size: int) -> torch.Tensor:
        """A decode batch of B <= size sequences (B = 0 on an idle rank) through the graph of `size` -> hidden [B, D]
        (a view into the graph's output: read it before the next step)."""
        self._use(ep)
        B = len(input_ids)
        assert B <= size and size in self.sizes, (B, size)
        if size not in self.graphs:
            self._capture(size, ep)
        self._fill(input_ids, positions, slot_mapping, seq_lens, block_tables, size)
        self.static.copy_(self.host, non_blocking=True)
        graph, out = self.graphs[size]
        graph.replay()
        self.replays += 1
        return out[:B]
