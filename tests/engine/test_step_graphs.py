"""The padded batches CUDA graphs replay (engine/cuda_graphs.py), run without a graph on the CPU: the rows of the
real tokens equal the unpadded step's, and padding rows count no expert load. A replay computes exactly this on
the GPU (tests/gpu/test_gpu.py compares replays with eager steps there)."""

from __future__ import annotations

import torch

from eep_hpc.engine.cuda_graphs import StepGraphs, capture_sizes, mixed_capture_sizes
from support import save_random_hf_model, single_rank_engine

BLOCK = 4


def _batch(rng: torch.Generator, vocab: int, qlens: list[int], contexts: list[int]):
    """Token ids, positions, slots, seq_lens and block tables of sequences with `contexts` cached tokens and
    `qlens` new ones, on blocks 1, 2, 3, ... (block 0 left unused)."""
    ids, pos, slots, seq_lens, tables, nxt = [], [], [], [], [], 1
    for q, c in zip(qlens, contexts):
        n = -(-(q + c) // BLOCK)
        table = list(range(nxt, nxt + n))
        nxt += n
        ids += torch.randint(0, vocab, (q,), generator=rng).tolist()
        pos += range(c, c + q)
        slots += [table[p // BLOCK] * BLOCK + p % BLOCK for p in range(c, c + q)]
        seq_lens.append(c + q)
        tables.append(table)
    return ids, pos, slots, qlens, seq_lens, tables


def test_capture_sizes():
    assert capture_sizes(40) == [1, 2, 4, 8, 16, 32, 40]
    assert mixed_capture_sizes(512) == [32, 64, 128, 256, 384, 512]
    assert mixed_capture_sizes(300) == [32, 64, 128, 256, 300] and mixed_capture_sizes(0) == []


def test_padded_steps_equal_unpadded_ones(tmp_path):
    path = save_random_hf_model("qwen3_moe", tmp_path / "m")
    engine = single_rank_engine(path, 8, 2, block_size=BLOCK, max_num_batched_tokens=64)
    runner, ep, vocab = engine.runner, engine.ep, engine.model.arch.vocab_size
    graphs = StepGraphs(engine.model, runner.kv_caches, BLOCK, 8, 64 // BLOCK, torch.device("cpu"), 64)
    rng = torch.Generator().manual_seed(0)
    # the cached context the steps below attend to: one eager prefill of every sequence's first tokens
    contexts = [9, 0, 5, 30]
    runner.forward(*_batch(rng, vocab, contexts, [0] * 4), ep)
    ep.take_load()
    cases = [([1, 7, 1, 1], True, 32),  # a mixed step: three decodes and a prefill chunk, in the 32-token graph
             ([3, 20, 2, 1], True, 64),  # 26 tokens, padded to 64
             ([1, 1, 1, 1], False, 8)]  # a decode step in the graph of 8 sequences
    for qlens, mixed, size in cases:
        batch = _batch(torch.Generator().manual_seed(len(qlens) + size), vocab, qlens, contexts)
        ep.plan(chunks=1, chunk_tokens=sum(qlens))  # an eager step's plan (as ModelRunner.run sets it)
        want = runner.forward(*batch, ep).clone()
        want_load = ep.take_load()
        got = graphs.forward_eager(*batch, ep, size, mixed)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert torch.equal(ep.take_load(), want_load)  # padding rows reached no expert
