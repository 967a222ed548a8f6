"""Build a model for one rank: the skeleton, its non-expert weights, and the experts of its own slots.

FP8 (model/fp8.py): the model is built from the arch of what it stores, i.e. `arch.quantization` is set only when
its expert slots stay fp8 (CUDA with Triton); the weight source dequantises everything else.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from eep_hpc.config import ModelConfig
from eep_hpc.kernels.fp8 import cdiv
from eep_hpc.model.arch import MoEArch, load_arch
from eep_hpc.model.decoder import MoEForCausalLM
from eep_hpc.model.deepseek_v2 import DeepseekV2ForCausalLM
from eep_hpc.model.fp8 import Fp8Source, expert_format, weight_format
from eep_hpc.model.hf_names import expert_names, hf_names
from eep_hpc.model.load_progress import LoadProgress, layer_groups
from eep_hpc.model.weights import DummySource, SafetensorsSource


def model_class(arch: MoEArch) -> type[MoEForCausalLM] | type[DeepseekV2ForCausalLM]:
    """The module class of an architecture; all take (arch, num_local_slots, max_positions)."""
    return DeepseekV2ForCausalLM if arch.kind == "deepseek_v2" else MoEForCausalLM


def weight_source(cfg: ModelConfig, model_dir: Path, device: torch.device, arch: MoEArch | None = None):
    """Dummy or checkpoint weights; FP8 ones (a quantised checkpoint, or `quantization = "fp8"`) through an
    `Fp8Source`, whose `get` dequantises."""
    source = DummySource(cfg.seed, device) if cfg.load_format == "dummy" else SafetensorsSource(model_dir)
    arch = arch or load_arch(model_dir)
    fmt = weight_format(cfg, arch)
    if fmt is None:
        return source
    return Fp8Source(source, fmt, stored=isinstance(source, SafetensorsSource) and arch.quantization is not None)


def is_expert_param(name: str) -> bool:
    return name.endswith(".w13") or name.endswith(".w2")


def dense_params(model: MoEForCausalLM) -> list[tuple[str, torch.nn.Parameter]]:
    """The parameters load_dense fills: all but the expert slots (and a tied lm_head)."""
    return [(name, p) for name, p in model.named_parameters()
            if not (is_expert_param(name) or (name == "lm_head.weight" and model.arch.tie_word_embeddings))]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@torch.inference_mode()
def load_dense(model: MoEForCausalLM, source, on_loaded=None) -> None:
    """Every parameter except the expert slots; on_loaded(bytes) after each."""
    for name, param in dense_params(model):
        names = hf_names(model.arch, name)
        if len(names) == 1:
            param.copy_(source.get(names[0], tuple(param.shape)))
        else:
            rows = model.get_submodule(name.rsplit(".", 2)[0]).qkv_split  # a stacked projection's part sizes
            for part, dst in zip(names, param.split(rows), strict=True):
                dst.copy_(source.get(part, tuple(dst.shape)))
        if on_loaded is not None:
            on_loaded(nbytes(param))


@torch.inference_mode()
def load_expert_slot(model: MoEForCausalLM, source, moe_index: int, slot: int, logical: int, into=None) -> None:
    """The checkpoint's expert `logical` of MoE layer `moe_index` into local `slot` of the model's block, or of
    `into` (like a block: w13, w2, w13_scale, w2_scale and fp8_block; e.g. the staged slots of a new epoch)."""
    arch = model.arch
    block = into if into is not None else model.moe_blocks()[moe_index]
    layer = arch.moe_layers[moe_index]
    I, D = arch.moe_intermediate_size, arch.hidden_size
    gate, up, down = expert_names(arch, layer, logical)
    if block.fp8_block is None:
        block.w13[slot, :I].copy_(source.get(gate, (I, D)))
        block.w13[slot, I:].copy_(source.get(up, (I, D)))
        block.w2[slot].copy_(source.get(down, (D, I)))
        return
    g = cdiv(I, block.fp8_block[0])  # scale rows of the gate half
    for q_dst, s_dst, name, shape in ((block.w13[slot, :I], block.w13_scale[slot, :g], gate, (I, D)),
                                      (block.w13[slot, I:], block.w13_scale[slot, g:], up, (I, D)),
                                      (block.w2[slot], block.w2_scale[slot], down, (D, I))):
        q, scale = source.get_fp8(name, shape)
        q_dst.copy_(q)
        s_dst.copy_(scale)


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
    progress_stream=None,
) -> MoEForCausalLM:
    """local_logical[moe_layer][local_slot] = logical expert this rank holds there (empty lists: slots left
    unfilled, for weights that arrive from peers). Progress goes to `progress_stream` (default stderr): a bar on a
    terminal, else log lines (model/load_progress.py)."""
    if num_local_slots is None:
        num_local_slots = len(local_logical[0]) if local_logical else 0
    # built directly in the serving dtype on the device (an fp32 detour would need twice the memory); rope tables
    # name their fp32 dtype explicitly
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            built = dataclasses.replace(arch, quantization=expert_format(cfg, arch, device))
            model = model_class(arch)(built, num_local_slots, max_positions)
    finally:
        torch.set_default_dtype(previous)
    model.eval()
    source = weight_source(cfg, model_dir, device, arch)
    blocks = model.moe_blocks()
    slot_bytes = [sum(nbytes(t) // len(t) for t in (b.w13, b.w2, b.w13_scale, b.w2_scale) if t is not None and len(t))
                  for b in blocks]
    total = sum(nbytes(p) for _, p in dense_params(model)) if load_dense_weights else 0
    total += sum(len(logicals) * slot_bytes[i] for i, logicals in enumerate(local_logical))
    what = f"loading {'dummy weights' if cfg.load_format == 'dummy' else 'weights from ' + str(model_dir)}"
    progress = LoadProgress(total, what, stream=progress_stream)
    if load_dense_weights:
        with progress.group("dense weights"):
            load_dense(model, source, progress.add)
    for layers in layer_groups(len(local_logical)):
        if not any(local_logical[i] for i in layers):
            continue
        which = f"layer {layers[0]}" if len(layers) == 1 else f"layers {layers[0]}-{layers[-1]}"
        with progress.group(f"experts of MoE {which} of {len(local_logical)}"):
            for moe_index in layers:
                for slot, logical in enumerate(local_logical[moe_index]):
                    load_expert_slot(model, source, moe_index, slot, logical)
                    progress.add(slot_bytes[moe_index])
    progress.close()
    return model
