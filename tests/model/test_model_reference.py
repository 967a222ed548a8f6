"""eep-hpc's models against Hugging Face transformers on small random checkpoints (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from support import hf_model, save_random_hf_model
from support import NEW_TOKENS, TOKEN_PROMPTS as PROMPTS, greedy, single_rank_engine


@pytest.fixture(scope="module", params=["qwen3_moe", "mixtral"])
def checkpoint(request, tmp_path_factory):
    path = save_random_hf_model(request.param, tmp_path_factory.mktemp(request.param))
    return path, hf_model(path)


def test_logits_match_transformers(checkpoint):
    path, ref = checkpoint
    arch = ref.config
    engine = single_rank_engine(path, arch.num_local_experts if hasattr(arch, "num_local_experts") else arch.num_experts,
                                sum(1 for layer in ref.model.layers if hasattr(layer.mlp, "experts") or hasattr(layer, "block_sparse_moe")))
    runner = engine.runner
    ids, pos, slots, qlens, tables = [], [], [], [], []
    next_block = 0
    for p in PROMPTS:
        nblk = -(-len(p) // 16)
        table = list(range(next_block, next_block + nblk))
        next_block += nblk
        ids += p
        pos += range(len(p))
        slots += [table[i // 16] * 16 + i % 16 for i in range(len(p))]
        qlens.append(len(p))
        tables.append(table)
    hidden = runner.forward(ids, pos, slots, qlens, qlens, tables, engine.ep)
    logits = engine.model.compute_logits(hidden)
    start = 0
    for p in PROMPTS:
        with torch.no_grad():
            want = ref(torch.tensor([p])).logits[0]
        got = logits[start : start + len(p)]
        start += len(p)
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 1e-4, f"relative error {rel:.2e} for a prompt of {len(p)} tokens"


def test_greedy_tokens_match_transformers(checkpoint):
    path, ref = checkpoint
    cfg = ref.config
    num_experts = getattr(cfg, "num_experts", None) or cfg.num_local_experts
    num_moe = len([i for i in range(cfg.num_hidden_layers) if i not in (getattr(cfg, "mlp_only_layers", None) or [])])
    # a small block budget forces chunked prefill and mixes prefill with decode in one batch
    engine = single_rank_engine(path, num_experts, num_moe, max_num_batched_tokens=24, num_kv_blocks=64)
    ours = greedy(engine, PROMPTS, NEW_TOKENS)
    for p, got in zip(PROMPTS, ours):
        with torch.no_grad():
            want = ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                min_new_tokens=NEW_TOKENS)[0, len(p):].tolist()
        assert got == want
    assert engine.block_manager.num_used_blocks == 0
