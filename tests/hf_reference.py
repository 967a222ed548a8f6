"""Small random Hugging Face MoE checkpoints (transformers is a test-only dependency)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_random_hf_model(kind: str, path: Path, seed: int = 0) -> Path:
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
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=8, rope_theta=1e6)
        model = transformers.MixtralForCausalLM(cfg)
    # HF initialises with std 0.02: scale up so logits are spread and greedy choices are clear-cut
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if p.dim() > 1 else 1.0)
    model.save_pretrained(path)
    return path


def hf_model(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()
