"""Build a model for one rank: the skeleton, its non-expert weights, and the experts of its own slots."""

from __future__ import annotations

from pathlib import Path

import torch

from eep_hpc.config import ModelConfig
from eep_hpc.model.arch import MoEArch
from eep_hpc.model.decoder import MoEForCausalLM
from eep_hpc.model.deepseek_v2 import DeepseekV2ForCausalLM
from eep_hpc.model.hf_names import expert_names, hf_name
from eep_hpc.model.weights import DummySource, SafetensorsSource


def model_class(arch: MoEArch) -> type[MoEForCausalLM] | type[DeepseekV2ForCausalLM]:
    """The module class of an architecture; all take (arch, num_local_slots, max_positions)."""
    return DeepseekV2ForCausalLM if arch.kind == "deepseek_v2" else MoEForCausalLM


def weight_source(cfg: ModelConfig, model_dir: Path, device: torch.device):
    if cfg.load_format == "dummy":
        return DummySource(cfg.seed, device)
    return SafetensorsSource(model_dir)


def is_expert_param(name: str) -> bool:
    return name.endswith(".w13") or name.endswith(".w2")


@torch.inference_mode()
def load_dense(model: MoEForCausalLM, source) -> None:
    """Every parameter except the expert slots."""
    for name, param in model.named_parameters():
        if is_expert_param(name) or (name == "lm_head.weight" and model.arch.tie_word_embeddings):
            continue
        param.copy_(source.get(hf_name(model.arch, name), tuple(param.shape)))


@torch.inference_mode()
def load_expert_slot(model: MoEForCausalLM, source, moe_index: int, slot: int, logical: int) -> None:
    arch = model.arch
    block = model.moe_blocks()[moe_index]
    layer = arch.moe_layers[moe_index]
    I, D = arch.moe_intermediate_size, arch.hidden_size
    gate, up, down = expert_names(arch, layer, logical)
    block.w13[slot, :I].copy_(source.get(gate, (I, D)))
    block.w13[slot, I:].copy_(source.get(up, (I, D)))
    block.w2[slot].copy_(source.get(down, (D, I)))


def build_model(
    arch: MoEArch,
    cfg: ModelConfig,
    model_dir: Path,
    local_logical: list[list[int]],
    max_positions: int,
    device: torch.device,
    dtype: torch.dtype,
    num_local_slots: int | None = None,
    load_dense_weights: bool = True,
) -> MoEForCausalLM:
    """local_logical[moe_layer][local_slot] = logical expert this rank holds there (empty lists: slots left
    unfilled, for weights that arrive from peers)."""
    if num_local_slots is None:
        num_local_slots = len(local_logical[0]) if local_logical else 0
    # built directly in the serving dtype on the device (an fp32 detour would need twice the memory); rope tables
    # name their fp32 dtype explicitly
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_class(arch)(arch, num_local_slots, max_positions)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    source = weight_source(cfg, model_dir, device)
    if load_dense_weights:
        load_dense(model, source)
    for moe_index, logicals in enumerate(local_logical):
        for slot, logical in enumerate(logicals):
            load_expert_slot(model, source, moe_index, slot, logical)
    return model
