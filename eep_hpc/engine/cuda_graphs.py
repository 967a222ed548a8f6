"""CUDA graphs for steps: one graph per padded size, replayed instead of ~20 kernel launches per layer.

Two families, each captured at a list of padded sizes:
- **decode graphs**, by sequences: every sequence brings one new token (no prompt logprobs); attention runs its
  decode configuration (split-KV for small batches). B sequences run the graph of the size the step's plan agreed
  (parallel/step_plan.py: the smallest captured size >= the largest B of any rank; an idle rank replays it with
  B = 0).
- **mixed graphs**, by tokens: prefill chunks and decodes together, up to `max_mixed_tokens` tokens (vLLM captures
  such steps too: an eager step of a few hundred tokens costs ~1,000 Python launches, 40-50 ms on the lent GPUs,
  for ~15 ms of GPU work). A graph of T tokens holds up to T sequences; attention runs its prefill configuration,
  whose grid depends on T and the sequence count only (kernels/triton_attention.py).

Inputs go into static buffers the graphs were captured with. Padding tokens belong to padding sequences with
seq_len 0 and slot -1, so they write no KV and read nothing (kernels/NOTES.md lists what the kernels need): each
padding sequence takes one token while there are tokens left (the last takes the rest, further ones none). The
router gives padding rows no expert (`num_valid`), so they are never dispatched nor counted as load.

A graph bakes in the tensors it saw: the expert weights and the `ExpertParallel` of its epoch. A commit that
changes their shapes or the communication (another buffer, a one-rank epoch) drops this rank's graphs, and each
size is re-captured on first use; one that does not (a rebalance, a recovery, a grow or shrink whose slots fit the
rank's slot tensors and whose nixl_ep layout stays) writes the new experts and tables into the captured tensors
and keeps every graph (`keep_for`). Ranks capture in step (at startup all sizes, in the same order; later each
size at the step that first agrees on it), since a capture's warm-up runs the epoch's collectives: a rank that
joined captures while those that kept theirs replay with no rows (a capture round, parallel/step_plan.py). Only
an epoch whose all-to-all is graph-safe (no host sync, no host collective: one rank, or nixl_ep) runs graphs;
others run eagerly. On the CPU with EEP_HPC_GRAPH_STANDIN=1 the same path runs with no graph recorded (a replay,
and a capture's warm-up, are eager forwards of the padded batch), so tests cover the plans and capture rounds.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from eep_hpc.kernels import ops
from eep_hpc.kernels.attention import AttentionMetadata
from eep_hpc.model.moe import ExpertParallel
from eep_hpc.parallel.all_to_all import graph_standin
from eep_hpc.parallel.step_plan import GraphSizes

log = logging.getLogger("eep_hpc.cuda_graphs")


def capture_sizes(max_batch: int) -> list[int]:
    """Decode graphs: 1, 2, 4, 8, then every multiple of 16 up to max_batch (and max_batch itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes and sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def mixed_capture_sizes(max_tokens: int) -> list[int]:
    """Mixed graphs: 32, 64, 128, 256, then every multiple of 128 up to max_tokens (and max_tokens itself)."""
    sizes = [s for s in (32, 64, 128, 256) if s <= max_tokens] + list(range(384, max_tokens + 1, 128))
    if max_tokens >= 32 and sizes[-1] != max_tokens:
        sizes.append(max_tokens)
    return sizes


class StepGraphs:
    def __init__(self, model, kv_caches, block_size: int, max_batch: int, max_blocks_per_seq: int,
                 device: torch.device, max_mixed_tokens: int = 0):
        self.model, self.kv_caches, self.block_size, self.device = model, kv_caches, block_size, device
        self.standin = graph_standin(device)  # the CPU's stand-in: a replay or a capture is an eager forward
        self.sizes = GraphSizes(tuple(capture_sizes(max_batch)), tuple(mixed_capture_sizes(max_mixed_tokens)))
        self.max_batch = self.sizes.decode[-1] if self.sizes.decode else 0
        self.width = max(1, max_blocks_per_seq)
        T = B = max(self.max_batch, max(self.sizes.mixed, default=0))
        W = self.width
        self.capacity = T
        # one flat int64 buffer, same layout on host (pinned) and device, copied in one go per step:
        # [input_ids T | positions T | slot_mapping T | query_start_loc B+1 | seq_lens B | block_tables B*W |
        #  num_valid 1]
        self.offsets = np.cumsum([0, T, T, T, B + 1, B, B * W, 1])
        # on CUDA two pinned host buffers taken in turn, each with the event of its latest non-blocking copy: a
        # step that samples nothing syncs nowhere, so the host can fill step n + 1 before the GPU has copied step n
        # (queued behind step n - 1's replay); it waits only for the copy of step n - 1, which keeps the overlap
        cuda = device.type == "cuda"
        self._hosts = [torch.zeros(int(self.offsets[-1]), dtype=torch.long) for _ in range(2 if cuda else 1)]
        if cuda:
            self._hosts = [h.pin_memory() for h in self._hosts]
        self._host_nps = [h.numpy() for h in self._hosts]
        self._copied = [torch.cuda.Event() if cuda else None for _ in self._hosts]
        self._turn = 0
        self.host, self.host_np = self._hosts[0], self._host_nps[0]
        self.static = torch.zeros_like(self.host, device=device)
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.ep: ExpertParallel | None = None
        self.replays = 0
        self.partner_replays = 0  # replays with no rows that matched another rank's capture (capture rounds)
        self.resets = 0
        self._missing: tuple = (None, ())

    def _region(self, buf, i: int):
        return buf[self.offsets[i] : self.offsets[i + 1]]

    def sizes_for(self, ep: ExpertParallel, max_tokens: int = 0) -> GraphSizes:
        """The graph sizes this epoch can replay (none when its all-to-all is not capturable); mixed graphs only
        up to max_tokens (the epoch's dispatch capacity; 0 = no limit)."""
        if not ep.graph_safe:
            return GraphSizes()
        if not max_tokens:
            return self.sizes
        return GraphSizes(self.sizes.decode, tuple(s for s in self.sizes.mixed if s <= max_tokens))

    def _fill(self, input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables, T: int) -> None:
        """Write a batch of t <= T tokens in b <= T sequences, and its padding, into the next host buffer."""
        self._turn = (self._turn + 1) % len(self._hosts)
        if self._copied[self._turn] is not None:
            self._copied[self._turn].synchronize()  # its last copy to the GPU has read it (at once, mostly)
        self.host, self.host_np = self._hosts[self._turn], self._host_nps[self._turn]
        t, b, h, W = len(input_ids), len(seq_lens), self.host_np, self.width
        ids, pos, slots, qsl, lens, tables, num_valid = (self._region(h, i) for i in range(7))
        num_valid[0] = t
        ids[:t], pos[:t], slots[:t], lens[:b] = input_ids, positions, slot_mapping, seq_lens
        ids[t:T] = 0
        pos[t:T] = 0
        slots[t:T] = -1
        lens[b:T] = 0
        qsl[0] = 0
        if b:
            qsl[1 : b + 1] = np.cumsum(query_lens)
        # padding sequences b .. T-1: one token each while tokens last, the rest to the last one
        qsl[b + 1 : T + 1] = np.minimum(np.arange(t + 1, t + 1 + T - b), T)
        qsl[T] = T
        tables = tables.reshape(self.capacity, W)
        for i, row in enumerate(block_tables):
            tables[i, : len(row)] = row

    def _meta(self, T: int, mixed: bool) -> AttentionMetadata:
        s = self.static
        qsl, lens = self._region(s, 3)[: T + 1], self._region(s, 4)[:T]
        tables = self._region(s, 5).view(self.capacity, self.width)[:T]
        # the host copies only the torch reference reads (CPU: `forward_eager`); a graph's kernels never do
        on_host = s.device.type == "cpu"
        return AttentionMetadata(
            slot_mapping=self._region(s, 2)[:T], query_start_loc=qsl if on_host else torch.arange(T + 1),
            seq_lens=lens if on_host else torch.zeros(T, dtype=torch.long), block_tables=tables,
            block_size=self.block_size, query_start_loc_device=qsl, seq_lens_device=lens,
            # attention picks its prefill configuration for query_len > 1 (its grid: T and the sequence count)
            max_query_len=T if mixed else 1, max_seq_len=self.width * self.block_size,
            block_tables_host=tables if on_host else torch.zeros(T, self.width, dtype=torch.long),
        )

    def _forward(self, T: int, mixed: bool, ep: ExpertParallel) -> torch.Tensor:
        s = self.static
        ep.plan(chunks=1, chunk_tokens=T, num_valid=self._region(s, 6))
        return self.model(self._region(s, 0)[:T], self._region(s, 1)[:T], self.kv_caches, self._meta(T, mixed), ep)

    def _capture(self, T: int, mixed: bool, ep: ExpertParallel) -> None:
        t0 = time.monotonic()
        self._fill([], [], [], [], [], [], T)
        self.static.copy_(self.host)
        if self.standin:  # the warm-up forward a capture runs (its exchanges); nothing recorded
            with ops.graph_kernels():
                self._forward(T, mixed, ep)
            self.graphs[(T, mixed)] = (None, None)
            return
        with ops.graph_kernels():  # the same kernels in the warm-up as in the capture
            self._forward(T, mixed, ep)  # compiles the kernels of this size outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._forward(T, mixed, ep)
        torch.cuda.synchronize(self.device)
        self.graphs[(T, mixed)] = (graph, out)
        log.debug("captured %s graph for %d %s in %.2f s", "mixed" if mixed else "decode", T,
                  "tokens" if mixed else "sequences", time.monotonic() - t0)

    def capture_all(self, ep: ExpertParallel, max_tokens: int = 0) -> None:
        """Capture every size now (largest first, so smaller graphs reuse its pool), e.g. at startup; every rank of
        a multi-rank epoch together, in the same order."""
        sizes = self.sizes_for(ep, max_tokens)
        keys = sorted([(s, False) for s in sizes.decode] + [(s, True) for s in sizes.mixed], reverse=True)
        if not keys:
            return
        t0 = time.monotonic()
        self._use(ep)
        for T, mixed in keys:
            if (T, mixed) not in self.graphs:
                self._capture(T, mixed, ep)
        log.info("captured %d decode CUDA graphs (batch sizes %s) and %d mixed ones (tokens %s) in %.1f s",
                 len(sizes.decode), _span(sizes.decode), len(sizes.mixed), _span(sizes.mixed),
                 time.monotonic() - t0)

    def _use(self, ep: ExpertParallel) -> None:
        if ep is not self.ep:
            self.reset()
            self.ep = ep

    def keep_for(self, ep: ExpertParallel) -> None:
        """The graphs go on serving `ep`, which took over the device tensors they captured
        (`ExpertParallel.adopt_tensors`): a commit that re-captures nothing."""
        if self.ep is not None:
            self.ep = ep

    def reset(self) -> None:
        """Drop every graph: they hold the previous epoch's expert tensors and maps (memory a new epoch needs).
        Their pool goes with them; a handle whose graphs are all gone must not be captured into again."""
        self.graphs.clear()
        self.pool, self.ep = None, None
        self.resets += 1

    def missing(self, sizes: GraphSizes, ep: ExpertParallel) -> tuple[int, ...]:
        """Per size of `sizes` (decode, then mixed): 1 where this rank has no graph for `ep` (what it tells the
        step's agreement; computed again only after a capture or a reset). Graphs of another epoch count as none:
        `run` would drop them."""
        key = (sizes, len(self.graphs), self.resets, ep is self.ep)
        if self._missing[0] != key:
            have = self.graphs if ep is self.ep else {}
            self._missing = (key, tuple(int((s, False) not in have) for s in sizes.decode)
                             + tuple(int((s, True) not in have) for s in sizes.mixed))
        return self._missing[1]

    def run(self, input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables, ep: ExpertParallel,
            size: int, mixed: bool = False, capture_round: bool = False) -> torch.Tensor:
        """A batch of t <= size tokens (t = 0 on an idle rank) through the decode graph of `size` sequences (every
        query_len 1) or the mixed graph of `size` tokens -> hidden [t, D] (a view into the graph's output: read it
        before the next step). capture_round: some rank of the epoch lacks this graph and captures it now
        (parallel/step_plan.py); a rank that has it replays it once with no rows first, the partner of the
        capture's warm-up forward."""
        self._use(ep)
        t = len(input_ids)
        assert t <= size and size in (self.sizes.mixed if mixed else self.sizes.decode), (t, size, mixed)
        if (size, mixed) not in self.graphs:  # first use since this rank joined, or since a commit dropped them
            t0 = time.monotonic()
            self._capture(size, mixed, ep)
            log.info("captured the %s graph of %d on first use in %.2f s", "mixed" if mixed else "decode", size,
                     time.monotonic() - t0)
        elif capture_round:  # the next fill takes the other host buffer: this one's copy may still be queued
            self._replay([], [], [], [], [], [], size, mixed)
            self.partner_replays += 1
            log.info("replayed the %s graph of %d with no rows while a peer captured it", "mixed" if mixed else "decode",
                     size)
        out = self._replay(input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables, size, mixed)
        self.replays += 1
        return out[:t]

    def _replay(self, input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables, size: int,
                mixed: bool) -> torch.Tensor:
        self._fill(input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables, size)
        self.static.copy_(self.host, non_blocking=True)
        if self.standin:  # what the graph would compute, with the epoch's tensors it was "captured" with
            with ops.graph_kernels():
                return self._forward(size, mixed, self.ep)
        self._copied[self._turn].record()
        graph, out = self.graphs[(size, mixed)]
        graph.replay()
        return out

    def forward_eager(self, input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables,
                      ep: ExpertParallel, size: int, mixed: bool = False) -> torch.Tensor:
        """What a replay of the graph of `size` computes, run without a graph (tests; the CPU)."""
        self._fill(input_ids, positions, slot_mapping, query_lens, seq_lens, block_tables, size)
        self.static.copy_(self.host)
        with ops.graph_kernels():
            return self._forward(size, mixed, ep)[: len(input_ids)]


def _span(sizes) -> str:
    return f"{sizes[0]}..{sizes[-1]}" if sizes else "none"
