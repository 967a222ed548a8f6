"""The padded batches CUDA graphs replay (engine/cuda_graphs.py), run without a graph on the CPU: the rows of the
real tokens equal the unpadded step's, and padding rows count no expert load. A replay computes exactly this on
the GPU (tests/gpu/test_gpu.py compares replays with eager steps there)."""

from __future__ import annotations

import pytest
import torch

from eep_hpc.engine.cuda_graphs import StepGraphs, capture_sizes, mixed_capture_sizes
from support import engine_for, save_random_hf_model, single_rank_engine

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_replays_in_a_row_that_sample_nothing_each_read_their_own_batch():
    """A long prompt prefilled alone in chunks, each chunk a mixed-graph replay: no token is sampled, so nothing
    syncs between the steps, and the host fills the next batch while the GPU has not yet copied the last one
    (here the GPU is held back at the start, as a long replay before them would). Each replay must still read
    its own batch: the KV cache written equals that of the same chunks run eagerly."""
    from eep_hpc.model.tiny import ensure_tiny_checkpoint

    engine = engine_for(ensure_tiny_checkpoint(), device="cuda")
    runner, ep, graphs = engine.runner, engine.ep, engine.runner.graphs
    block, vocab = runner.block_size, engine.model.arch.vocab_size
    chunk, chunks = 32, 5
    assert graphs is not None and chunk in graphs.sizes.mixed
    rng = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, vocab, (chunk * chunks,), generator=rng).tolist()
    table = list(range(1, 1 + -(-len(prompt) // block)))

    def step(k: int):
        pos = list(range(k * chunk, (k + 1) * chunk))
        slots = [table[p // block] * block + p % block for p in pos]
        return prompt[k * chunk:(k + 1) * chunk], pos, slots, [chunk], [(k + 1) * chunk], [table]

    def kv_after(run) -> list[torch.Tensor]:
        for k, v in runner.kv_caches:
            k.zero_()
            v.zero_()
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # the GPU busy for a while: every copy below queues behind it
        for k in range(chunks):
            run(*step(k))
        torch.cuda.synchronize()
        return [t.clone() for pair in runner.kv_caches for t in pair]

    def eager(*batch):
        ep.plan(chunks=1, chunk_tokens=chunk)
        runner.forward(*batch, ep)

    want = kv_after(eager)
    graphs.run(*step(0), ep, chunk, mixed=True)  # captured (if not yet) outside the timed-out window
    got = kv_after(lambda *batch: graphs.run(*batch, ep, chunk, mixed=True))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)
    assert all(w.abs().sum() > 0 for w in want)  # every layer's cache was written
