"""Small random Hugging Face MoE checkpoints (transformers is a test-only dependency)."""

from __future__ import annotations

from pathlib import Path

import torch


# DeepSeek-V2-Lite's shape in small: MLA with q straight from q_proj, yarn RoPE, a dense first layer, shared experts;
# and group-limited routing with a scaled top-k (V2's, not Lite's) so that every routing path is exercised.
DEEPSEEK_V2_LITE_LIKE = dict(
    num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
    q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                     "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1},
)
# DeepSeek-V2's (full) attention shape: q through a low-rank q_a_proj / q_a_layernorm / q_b_proj; greedy routing.
DEEPSEEK_V2_LIKE = dict(
    DEEPSEEK_V2_LITE_LIKE, q_lora_rank=24, topk_method="greedy", n_group=None, topk_group=None,
    routed_scaling_factor=1.0, num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def save_random_hf_model(kind: str, path: Path, seed: int = 0, **overrides) -> Path:
    """kind: qwen3_moe | mixtral | deepseek_v2_lite | deepseek_v2; overrides replace DeepSeek config fields."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=10000.0,
        )
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind.startswith("deepseek_v2"):
        shape = DEEPSEEK_V2_LITE_LIKE if kind == "deepseek_v2_lite" else DEEPSEEK_V2_LIKE
        cfg = transformers.DeepseekV2Config(**{**common, **shape, **overrides})
        model = transformers.DeepseekV2ForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=8, rope_theta=1e6)
        model = transformers.MixtralForCausalLM(cfg)
    # HF initialises with std 0.02: scale up so logits are spread and greedy choices are clear-cut
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if p.dim() > 1 else 1.0)
            elif kind.startswith("deepseek_v2"):  # norm weights away from 1, so a misplaced norm shows
                p.normal_(1.0, 0.2)
    model.save_pretrained(path)
    return path


def hf_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()
