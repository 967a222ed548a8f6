"""Hugging Face tensor names of each architecture, mapped onto eep-hpc's module names.

Our modules mirror Hugging Face's layout (model.layers.{i}.self_attn.q_proj ...) except where the architectures
differ (Mixtral's `block_sparse_moe`, w1/w3/w2) and for experts, which we stack per physical slot. DeepSeek-V2's
names (self_attn.q_proj / q_a_proj / q_a_layernorm / q_b_proj / kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj /
o_proj, mlp.gate, mlp.shared_experts.*, mlp.experts.{j}.gate_proj/up_proj/down_proj) are Qwen3-MoE's pattern.
"""

from __future__ import annotations

from eep_hpc.model.arch import MoEArch


# Our parameters that stack several checkpoint tensors along their rows, in row order.
STACKED = {".self_attn.qkv_proj.": (".self_attn.q_proj.", ".self_attn.k_proj.", ".self_attn.v_proj.")}


def hf_names(arch: MoEArch, ours: str) -> list[str]:
    """Names of the checkpoint tensors of a non-expert parameter: one, or the stacked parts (STACKED) in row
    order."""
    if ours.startswith("lm_head."):
        return [ours]
    name = "model." + ours
    if arch.kind == "mixtral":
        name = name.replace(".mlp.gate.", ".block_sparse_moe.gate.")
    for stacked, parts in STACKED.items():
        if stacked in name:
            return [name.replace(stacked, part) for part in parts]
    return [name]


def expert_names(arch: MoEArch, layer: int, expert: int) -> tuple[str, str, str]:
    """(gate, up, down) projection names of one logical expert."""
    if arch.kind == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}."
        return p + "w1.weight", p + "w3.weight", p + "w2.weight"
    p = f"model.layers.{layer}.mlp.experts.{expert}."
    return p + "gate_proj.weight", p + "up_proj.weight", p + "down_proj.weight"
