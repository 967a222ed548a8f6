"""The made-up requests a CUDA rank serves before real ones leave nothing behind: the same requests afterwards give
the same tokens (greedy and sampled from the engine's own random state) as on an engine that never served them."""

from __future__ import annotations

from eep_hpc import protocol as P
from support import TOKEN_PROMPTS as PROMPTS, save_random_hf_model, single_rank_engine


def serve(engine) -> dict[str, list[int]]:
    greedy = P.SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    sampled = P.SamplingParams(max_tokens=12, temperature=1.0, top_k=20, ignore_eos=True)  # the engine's generator
    for i, p in enumerate(PROMPTS):
        engine.add(P.AddRequest(request_id=f"g{i}", prompt_token_ids=p, sampling=greedy))
        engine.add(P.AddRequest(request_id=f"s{i}", prompt_token_ids=p, sampling=sampled))
    out: dict[str, list[int]] = {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return out


def test_warm_requests_leave_no_trace(tmp_path):
    path = save_random_hf_model("qwen3_moe", tmp_path / "m")
    cold = single_rank_engine(path, 8, 2, max_num_batched_tokens=512)
    warm = single_rank_engine(path, 8, 2, max_num_batched_tokens=512)
    warm.warm_requests()
    stats = warm.stats(with_load=True)
    assert (stats.steps, stats.kv_blocks_used, stats.num_running, stats.num_waiting) == (0, 0, 0, 0)
    assert stats.prefix_cache_queries == 0 and not any(any(row) for row in stats.expert_load)
    assert serve(warm) == serve(cold)


def test_runner_warmup_leaves_no_load_and_no_kv(tmp_path):
    """The warm-up prefills (every MoE tile class) count no expert load and write nothing to the KV cache."""
    path = save_random_hf_model("qwen3_moe", tmp_path / "m")
    engine = single_rank_engine(path, 8, 2, max_num_batched_tokens=512)
    before = [t.clone() for pair in engine.runner.kv_caches for t in pair]
    engine.runner.warmup(512, engine.ep)
    assert not engine.ep.load.any()
    after = [t for pair in engine.runner.kv_caches for t in pair]
    assert all(a.equal(b) for a, b in zip(before, after))
