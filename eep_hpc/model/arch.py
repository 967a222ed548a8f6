"""The architecture description every model here is built from, read from a Hugging Face config.json.

Qwen3-MoE and Mixtral share one decoder shape (GQA attention + a sparse MoE block of SwiGLU experts); they differ in
the few fields below. DeepSeek-V2 adds multi-head latent attention (`MLAArch`), group-limited routing with shared
experts (`DeepseekRouting`) and yarn RoPE (`YarnScaling`). Keys are read under both their old and new transformers
names (e.g. `rope_theta` vs `rope_parameters.rope_theta`, `rope_scaling.type` vs `rope_parameters.rope_type`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV2ForCausalLM": "deepseek_v2",
}


@dataclass(frozen=True)
class YarnScaling:
    """YaRN RoPE extension (DeepSeek's variant: `mscale`/`mscale_all_dim` set the cos/sin and softmax scales)."""

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None  # cos/sin scale; None: derived from factor and the mscales
    truncate: bool = True


@dataclass(frozen=True)
class MLAArch:
    """Multi-head latent attention: per token only the latent [kv_lora_rank] and the roped key [qk_rope_head_dim]
    are cached; kv_b_proj expands the latent into per-head k_nope [qk_nope_head_dim] and v [v_head_dim]."""

    q_lora_rank: int | None  # None: q_proj straight from the hidden state (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    attention_bias: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class DeepseekRouting:
    """Softmax router over `num_experts`, top-k within the best `topk_group` of `n_group` groups (one group:
    plain greedy), weights times `routed_scaling_factor`; `n_shared_experts` dense experts run on every token."""

    n_group: int
    topk_group: int
    routed_scaling_factor: float
    n_shared_experts: int


@dataclass(frozen=True)
class Fp8Quantization:
    """Block-scaled e4m3 weights (config.json `quantization_config` with quant_method "fp8", as Qwen3-*-FP8 and
    DeepSeek-V3 ship): each quantised linear weight [out, in] is float8_e4m3fn with a float32 `<name>_scale_inv`
    of one scale per `block` = (out, in) tile. Embeddings, norms, routers and lm_head stay unquantised."""

    block: tuple[int, int] = (128, 128)


@dataclass(frozen=True)
class MoEArch:
    kind: str  # "qwen3_moe" | "mixtral" | "deepseek_v2"
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
    # DeepSeek-V2 only:
    mla: MLAArch | None = None
    routing: DeepseekRouting | None = None
    rope_scaling: YarnScaling | None = None
    # How weights are stored: in the checkpoint (from config.json), and in a built model the expert slots (None
    # there when the loader dequantised them to the serving dtype).
    quantization: Fp8Quantization | None = None

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


def _rope_scaling(cfg: dict) -> tuple[float, YarnScaling | None]:
    """(rope_theta, yarn parameters or None) from `rope_parameters` (transformers 5) or `rope_scaling` (older)."""
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(f"rope type {kind!r} is not supported for DeepSeek-V2 (only default and yarn)")
    original = params.get("original_max_position_embeddings") or cfg.get("max_position_embeddings", 4096)
    factor = params.get("factor") or cfg.get("max_position_embeddings", original) / original
    return theta, YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        mscale=float(params.get("mscale") or 0.0),
        mscale_all_dim=float(params.get("mscale_all_dim") or 0.0),
        attention_factor=params.get("attention_factor"),
        truncate=bool(params.get("truncate", True)),
    )


def _deepseek_v2(cfg: dict, common: dict) -> MoEArch:
    unsupported = {
        "hidden_act": (cfg.get("hidden_act", "silu"), "silu"),
        "scoring_func": (cfg.get("scoring_func", "softmax"), "softmax"),
        "mlp_bias": (bool(cfg.get("mlp_bias", False)), False),
    }
    for key, (got, want) in unsupported.items():
        if got != want:
            raise ValueError(f"DeepSeek-V2 with {key}={got!r} is not supported (only {want!r})")
    if not cfg.get("n_routed_experts"):
        raise ValueError("DeepSeek-V2 without routed experts (n_routed_experts) is a dense model: not supported")
    num_experts, num_layers = cfg["n_routed_experts"], cfg["num_hidden_layers"]
    method = cfg.get("topk_method") or "greedy"
    if method == "greedy":
        n_group = topk_group = 1
    elif method == "group_limited_greedy":
        n_group, topk_group = cfg["n_group"], cfg["topk_group"]
        if num_experts % n_group or not 0 < topk_group <= n_group:
            raise ValueError(f"bad expert groups: {num_experts} experts, n_group={n_group}, topk_group={topk_group}")
    else:
        raise ValueError(f"topk_method {method!r} is not supported (greedy, group_limited_greedy)")
    # Layer i is MoE when i >= first_k_dense_replace and i % moe_layer_freq == 0 (DeepSeek's own modeling code)
    first_dense, freq = cfg.get("first_k_dense_replace", 0), cfg.get("moe_layer_freq", 1) or 1
    dense = frozenset(i for i in range(num_layers) if i < first_dense or i % freq != 0)
    theta, yarn = _rope_scaling(cfg)
    mla = MLAArch(
        q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"],
        qk_nope_head_dim=cfg["qk_nope_head_dim"],
        qk_rope_head_dim=cfg["qk_rope_head_dim"],
        v_head_dim=cfg["v_head_dim"],
        attention_bias=bool(cfg.get("attention_bias", False)),
    )
    common.update(num_kv_heads=common["num_heads"], head_dim=mla.qk_head_dim)
    return MoEArch(
        **common,
        num_experts=num_experts,
        moe_intermediate_size=cfg["moe_intermediate_size"],
        intermediate_size=cfg.get("intermediate_size", 0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        qk_norm=False,
        rope_theta=theta,
        dense_layers=dense,
        mla=mla,
        routing=DeepseekRouting(
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
            n_shared_experts=cfg.get("n_shared_experts") or 0,
        ),
        rope_scaling=yarn,
    )


def _quantization(cfg: dict) -> Fp8Quantization | None:
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method")
    if method != "fp8" or q.get("fmt", "e4m3") != "e4m3" or not q.get("weight_block_size"):
        raise ValueError(f"quantization {dict(q)} is not supported (only quant_method 'fp8', fmt 'e4m3' with "
                         "weight_block_size: block-scaled FP8 checkpoints)")
    bn, bk = q["weight_block_size"]
    return Fp8Quantization(block=(int(bn), int(bk)))


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
        quantization=_quantization(cfg),
    )
    if kind == "deepseek_v2":
        return _deepseek_v2(cfg, common)
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
