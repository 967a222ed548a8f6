"""DeepSeek-V2 against transformers' DeepseekV2ForCausalLM on small random checkpoints (fp32, CPU), and served by a
real head on 2 expert-parallel ranks across grow and shrink."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from eep_hpc import protocol as P
from eep_hpc.config import Config, EngineConfig, ModelConfig
from eep_hpc.engine.rank_engine import build_engine
from eep_hpc.model.arch import DeepseekRouting, parse_arch
from eep_hpc.model.deepseek_v2 import DeepseekV2ForCausalLM, route_deepseek
from eep_hpc.model.loader import build_model
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from support import hf_model, save_random_hf_model
from support import reference_texts, run_load
from eep_hpc.parallel.groups import EpochGroup
from support import NEW_TOKENS, TOKEN_PROMPTS as PROMPTS, greedy, start_head

# DeepSeek-V2-Lite's config.json as published (old-style rope_scaling), for parsing and cache sizing.
V2_LITE_CONFIG = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "bos_token_id": 100000,
    "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10944, "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
    "num_key_value_heads": 16, "q_lora_rank": None, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
    "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"}, "rope_theta": 10000,
    "routed_scaling_factor": 1.0, "scoring_func": "softmax", "tie_word_embeddings": False, "topk_group": 1,
    "topk_method": "greedy", "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 102400,
}


def test_v2_lite_config_parses():
    arch = parse_arch(V2_LITE_CONFIG)
    assert arch.kind == "deepseek_v2" and arch.num_experts == 64 and arch.top_k == 6
    assert arch.dense_layers == frozenset({0}) and len(arch.moe_layers) == 26
    assert arch.mla.q_lora_rank is None and arch.mla.qk_head_dim == 192
    assert arch.routing == DeepseekRouting(n_group=1, topk_group=1, routed_scaling_factor=1.0, n_shared_experts=2)
    assert arch.rope_scaling.factor == 40 and arch.rope_scaling.original_max_position_embeddings == 4096
    assert arch.mla.kv_lora_rank + arch.mla.qk_rope_head_dim == 576  # vs 2 * 16 heads * 192 for a full k/v cache


def test_unsupported_deepseek_configs_are_refused_by_name():
    for key, value in [("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("hidden_act", "gelu")]:
        with pytest.raises(ValueError, match=key if key != "topk_method" else "noaux_tc"):
            parse_arch({**V2_LITE_CONFIG, key: value})
    with pytest.raises(ValueError, match="longrope"):
        parse_arch({**V2_LITE_CONFIG, "rope_scaling": {"type": "longrope", "factor": 2.0}})


def test_group_limited_routing_picks_only_from_the_best_groups():
    # 8 experts in 4 groups of 2; group bests: g0 .30, g1 .25, g2 .20, g3 .05 -> groups 0 and 1 only
    probs = torch.tensor([[0.30, 0.01, 0.25, 0.02, 0.20, 0.19, 0.05, 0.0]])
    routing = DeepseekRouting(n_group=4, topk_group=2, routed_scaling_factor=2.0, n_shared_experts=0)
    ids, weights = route_deepseek(probs.log(), 3, routing, norm_topk_prob=False)
    assert ids.tolist() == [[0, 2, 3]]  # expert 4 (.20) and 5 (.19) sit in a dropped group
    assert torch.allclose(weights, 2.0 * probs[0, [0, 2, 3]] / probs.sum())
    ids, weights = route_deepseek(probs.log(), 3, routing, norm_topk_prob=True)
    assert torch.allclose(weights.sum(), torch.tensor(1.0))


@pytest.fixture(scope="module", params=["deepseek_v2_lite", "deepseek_v2"])
def checkpoint(request, tmp_path_factory):
    path = save_random_hf_model(request.param, tmp_path_factory.mktemp(request.param))
    return path, hf_model(path)


def engine_for(path, device: str = "cpu", dtype: str = "float32", **engine):
    """A single-rank engine in process holding every expert (like test_model_reference, on any device)."""
    arch = json.loads((path / "config.json").read_text())
    num_experts = arch["n_routed_experts"]
    num_moe = sum(1 for i in range(arch["num_hidden_layers"]) if i >= arch["first_k_dense_replace"])
    cfg = Config(model=ModelConfig(path=str(path), dtype=dtype), engine=EngineConfig(**engine))
    launch = P.RankLaunch(rank_id=0, head_address="", model_dir=str(path), eos_token_ids=[], device=device, config=cfg)
    epoch = P.Epoch(epoch=0, rank_ids=[0], store_host="", store_port=0,
                    physical_to_logical=[list(range(num_experts))] * num_moe, slot_offsets=[0, num_experts])
    return build_engine(launch, epoch, EpochGroup(None, 0, 0, 1, torch.device(device)))


def packed_prefill_logits(engine, prompts):
    """All prompts in one packed prefill, each in its own blocks -> logits [sum of lengths, V] on the CPU."""
    ids, pos, slots, qlens, tables = [], [], [], [], []
    next_block = 0
    for p in prompts:
        table = list(range(next_block, next_block + -(-len(p) // 16)))
        next_block += len(table)
        ids += p
        pos += range(len(p))
        slots += [table[i // 16] * 16 + i % 16 for i in range(len(p))]
        qlens.append(len(p))
        tables.append(table)
    hidden = engine.runner.forward(ids, pos, slots, qlens, qlens, tables, engine.ep)
    return engine.model.compute_logits(hidden).cpu()


def relative_errors(logits, ref, prompts) -> list[float]:
    """Per prompt, |ours - transformers| / |transformers| of its rows of the packed logits."""
    out, start = [], 0
    device = next(ref.parameters()).device
    for p in prompts:
        with torch.no_grad():
            want = ref(torch.tensor([p], device=device)).logits[0].float().cpu()
        got = logits[start : start + len(p)]
        start += len(p)
        out.append(((got - want).norm() / want.norm()).item())
    return out


def assert_logits_close(logits, ref, prompts, tol):
    for p, rel in zip(prompts, relative_errors(logits, ref, prompts)):
        assert rel < tol, f"relative error {rel:.2e} for a prompt of {len(p)} tokens"


def reference_greedy(ref, prompts):
    with torch.no_grad():
        return [ref.generate(torch.tensor([p]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS)[0, len(p):].tolist() for p in prompts]


def test_logits_match_transformers(checkpoint):
    path, ref = checkpoint
    assert_logits_close(packed_prefill_logits(engine_for(path), PROMPTS), ref, PROMPTS, 1e-4)


def test_greedy_tokens_match_transformers(checkpoint):
    path, ref = checkpoint
    # a small token budget forces chunked prefill and mixes prefill with decode in one batch
    engine = engine_for(path, max_num_batched_tokens=24, num_kv_blocks=64)
    assert greedy(engine, PROMPTS, NEW_TOKENS) == reference_greedy(ref, PROMPTS)
    assert engine.block_manager.num_used_blocks == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_gpu_matches_transformers(checkpoint):
    path, ref = checkpoint
    engine = engine_for(path, device="cuda", max_num_batched_tokens=24, num_kv_blocks=64)
    assert engine.runner.kv_caches[0].is_cuda
    # fp32 on both: TF32 is off by default for matmuls
    assert_logits_close(packed_prefill_logits(engine, PROMPTS), ref, PROMPTS, 1e-4)
    assert greedy(engine, PROMPTS, NEW_TOKENS) == reference_greedy(ref, PROMPTS)
    # bf16: within the error of transformers' own bf16 run (the scaled-up random weights amplify rounding)
    bf16 = engine_for(path, device="cuda", dtype="bfloat16", num_kv_blocks=64)
    ours = relative_errors(packed_prefill_logits(bf16, PROMPTS), ref, PROMPTS)
    hf_bf16 = hf_model(path, torch.bfloat16, "cuda")
    with torch.no_grad():
        theirs = torch.cat([hf_bf16(torch.tensor([p], device="cuda")).logits[0].float().cpu() for p in PROMPTS])
    theirs = relative_errors(theirs, ref, PROMPTS)
    print("bf16 relative errors, ours:", ours, "transformers':", theirs)
    assert max(ours) < 2 * max(theirs) + 1e-2


def test_dummy_weights_build_the_config_shape(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        **V2_LITE_CONFIG, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32, "kv_lora_rank": 32,
        "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16, "num_attention_heads": 4,
        "num_key_value_heads": 4, "num_hidden_layers": 3, "n_routed_experts": 8, "vocab_size": 300,
        "max_position_embeddings": 256}))
    arch = parse_arch(json.loads((tmp_path / "config.json").read_text()))
    mcfg = ModelConfig(path=str(tmp_path), load_format="dummy")
    model = build_model(arch, mcfg, tmp_path, [[5, 6]] * 2, 256, torch.device("cpu"), torch.float32)
    assert isinstance(model, DeepseekV2ForCausalLM)
    assert model.layers[1].mlp.w13.shape == (2, 64, 64)
    assert model.layers[1].mlp.shared_experts.gate_proj.weight.shape == (64, 64)
    assert model.layers[0].self_attn.kv_a_proj_with_mqa.weight.shape == (40, 64)
    caches = model.make_kv_caches(4, 16, torch.float32, torch.device("cpu"))
    assert len(caches) == 3 and caches[0].shape == (4, 16, 40)
    assert model.kv_cache_bytes_per_block(16, torch.bfloat16) == 3 * 16 * 40 * 2


MAX_TOKENS = 16


@pytest.fixture(scope="module")
def served_checkpoint(tmp_path_factory):
    """A DeepSeek-V2-Lite-shaped checkpoint with the tiny model's tokenizer (vocabulary of 512)."""
    path = save_random_hf_model("deepseek_v2_lite", tmp_path_factory.mktemp("deepseek-v2-served"), vocab_size=512)
    tiny = ensure_tiny_checkpoint()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny / name, path / name)
    return path


def test_two_ranks_serve_the_same_text_as_one_across_grow_and_shrink(served_checkpoint, tmp_path):
    head = start_head(tmp_path, ranks=2, model={"path": str(served_checkpoint)})
    coordinator = head.head.coordinator
    try:
        state = head.state()
        assert len(state["members"]) == 2
        for row in state["placement"]["physical_to_logical"]:  # 2 MoE layers (layer 0 is dense)
            assert set(row) == set(range(8))
        assert len(state["placement"]["physical_to_logical"]) == 2
        two = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        assert len(set(two)) > 1, "greedy texts should differ between prompts"

        async def scale_under_load(action):
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=4))
            await asyncio.sleep(0.3)
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(action(), head.loop))
            await asyncio.sleep(0.3)
            stop.set()
            return await load

        shrunk = asyncio.run(scale_under_load(lambda: coordinator.shrink([coordinator.members[-1]])))
        assert len(head.state()["members"]) == 1
        one = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        assert one == two
        grown = asyncio.run(scale_under_load(lambda: coordinator.grow(1)))
        assert len(head.state()["members"]) == 2
        assert asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS)) == one
        for result in (shrunk, grown):
            assert result.failures == [], result.failures[:5]
            assert result.completed > 0
            for k, texts in result.texts.items():
                assert all(t == one[k] for t in texts), f"prompt {k}: text changed while scaling"
    finally:
        head.stop()
