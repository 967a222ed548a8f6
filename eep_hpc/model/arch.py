"""The architecture description every model here is built from, read from a Hugging Face config.json.

Qwen3-MoE and Mixtral share one decoder shape (GQA attention + a sparse MoE block of SwiGLU experts); they differ in
the few fields below. Keys are read under both their old and new transformers names (e.g. `rope_theta` vs
`rope_parameters.rope_theta`, `num_experts` vs `num_local_experts`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}


@dataclass(frozen=True)
class MoEArch:
    kind: str  # "qwen3_moe" | "mixtral"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    top_k: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    qk_norm: bool
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: torch.dtype
    # Layers with a dense MLP instead of MoE (Qwen3's mlp_only_layers / decoder_sparse_step).
    dense_layers: frozenset[int] = field(default_factory=frozenset)
    intermediate_size: int = 0
    eos_token_ids: tuple[int, ...] = ()

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if i not in self.dense_layers]


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _rope_theta(cfg: dict, default: float) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"rope type {kind!r} is not supported yet (only default RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", default)))


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)


def parse_arch(cfg: dict) -> MoEArch:
    archs = cfg.get("architectures") or []
    kind = next((SUPPORTED[a] for a in archs if a in SUPPORTED), None)
    if kind is None:
        raise ValueError(f"unsupported architecture {archs}; supported: {sorted(SUPPORTED)}")
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    num_layers = cfg["num_hidden_layers"]
    common = dict(
        kind=kind,
        vocab_size=cfg["vocab_size"],
        hidden_size=hidden,
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or hidden // heads,
        top_k=cfg["num_experts_per_tok"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=_DTYPES.get(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16", torch.bfloat16),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
    )
    if kind == "qwen3_moe":
        step = cfg.get("decoder_sparse_step", 1) or 1
        only = set(cfg.get("mlp_only_layers") or [])
        dense = frozenset(i for i in range(num_layers) if i in only or (i + 1) % step != 0)
        return MoEArch(
            **common,
            num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
            moe_intermediate_size=cfg["moe_intermediate_size"],
            intermediate_size=cfg.get("intermediate_size", 0),
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            qk_norm=True,
            rope_theta=_rope_theta(cfg, 10000.0),
            dense_layers=dense,
        )
    if cfg.get("sliding_window") not in (None, 0) and cfg.get("use_sliding_window", True):
        # Mixtral checkpoints ship sliding_window=null; a set window would change attention.
        raise ValueError("Mixtral with a sliding window is not supported")
    return MoEArch(
        **common,
        num_experts=cfg["num_local_experts"],
        moe_intermediate_size=cfg["intermediate_size"],
        norm_topk_prob=True,
        qk_norm=False,
        rope_theta=_rope_theta(cfg, 1e6),
    )


def load_arch(model_dir: str | Path) -> MoEArch:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a model directory needs a Hugging Face config.json")
    return parse_arch(json.loads(path.read_text()))
