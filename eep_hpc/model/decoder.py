"""The MoE decoder shared by Qwen3-MoE and Mixtral (they differ only in q/k norm, router renorm and weight names)."""

from __future__ import annotations

import torch
from torch import nn

from eep_hpc.kernels import ops
from eep_hpc.kernels.attention import AttentionMetadata
from eep_hpc.model.arch import MoEArch
from eep_hpc.model.layers import Attention, DenseMLP, Linear, RMSNorm, RotaryEmbedding
from eep_hpc.model.moe import ExpertParallel, SparseMoE


class DecoderLayer(nn.Module):
    def __init__(self, arch: MoEArch, layer: int, rope: RotaryEmbedding, num_local_slots: int):
        super().__init__()
        a = arch
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.qk_norm, a.rms_norm_eps, rope)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        if layer in a.dense_layers:
            self.mlp = DenseMLP(a.hidden_size, a.intermediate_size)
        else:
            moe_index = a.moe_layers.index(layer)
            fp8_block = a.quantization.block if a.quantization else None  # fp8 expert slots (arch of the built model)
            self.mlp = SparseMoE(a.hidden_size, a.moe_intermediate_size, a.num_experts, a.top_k, a.norm_topk_prob,
                                 moe_index, num_local_slots, fp8_block)

    def forward(self, x, residual, positions, kv_cache, meta, ep: ExpertParallel):
        """(x, residual) -> (this layer's MLP output, the residual stream before it): each residual add happens
        inside the next norm (the first layer's residual is None: x is the embedding), and each norm inside the
        projection after it where that is one kernel (ops.rms_norm_linear: one row on the GPU)."""
        attn, mlp, norm1, norm2 = self.self_attn, self.mlp, self.input_layernorm, self.post_attention_layernorm
        qkv, _, residual = ops.rms_norm_linear(x, residual, norm1.weight, norm1.eps, attn.qkv_proj.weight)
        h = attn.attend(qkv, positions, kv_cache, meta)
        if isinstance(mlp, SparseMoE):  # the router's projection reads the norm; so do the experts
            logits, h, residual = ops.rms_norm_linear(h, residual, norm2.weight, norm2.eps, mlp.gate.weight,
                                                      keep_normed=True)
            return mlp.forward_routed(h, logits, ep), residual
        h, residual = norm2.add_forward(h, residual)
        return mlp(h), residual


class MoEForCausalLM(nn.Module):
    def __init__(self, arch: MoEArch, num_local_slots: int, max_positions: int):
        super().__init__()
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        rope = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, rope, num_local_slots) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size, bias=False)  # ops.linear: skinny GEMM at decode
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # The KV cache layout belongs to the architecture (GQA keeps k and v per head; other attention kinds, e.g.
    # DeepSeek's latent attention, keep other tensors): the runner allocates what these say and never looks inside.
    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        a = self.arch
        return 2 * a.num_layers * block_size * a.num_kv_heads * a.head_dim * dtype.itemsize

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> list:
        """One (k_cache, v_cache) pair per layer, each [num_blocks, block_size, Hkv, D]."""
        shape = (num_blocks, block_size, self.arch.num_kv_heads, self.arch.head_dim)
        return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                for _ in range(self.arch.num_layers)]

    def moe_blocks(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, SparseMoE)]

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata, ep: ExpertParallel):
        """input_ids, positions [T] -> hidden [T, D]. Runs every layer even for T = 0 (MoE collectives)."""
        x, residual = self.embed_tokens(input_ids), None
        for layer, kv in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, positions, kv, meta, ep)
        return self.norm.add_forward(x, residual)[0] if residual is not None else self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
