"""DeepSeek-V2 (V2-Lite, V2, V2.5): multi-head latent attention with a compressed paged cache, and an MoE block of
routed experts (expert-parallel slots, like SparseMoE) plus shared experts (dense, on every rank).

Module and parameter names mirror transformers' DeepseekV2ForCausalLM (model.layers.{i}.self_attn.kv_a_proj_with_mqa,
mlp.gate, mlp.shared_experts.*), except routed experts, which are stacked per physical slot (w13, w2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eep_hpc.kernels.attention import AttentionMetadata
from eep_hpc.kernels.mla import mla_attention_reference, write_latent
from eep_hpc.model.arch import DeepseekRouting, MoEArch
from eep_hpc.model.layers import DenseMLP, RMSNorm
from eep_hpc.model.moe import ExpertParallel, SparseMoE
from eep_hpc.model.rope import InterleavedRotaryEmbedding, softmax_mscale

# DeepSeek's modeling code builds q_a_layernorm and kv_a_layernorm with the RMSNorm default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


class MLAttention(nn.Module):
    """Multi-head latent attention. Cache per layer: [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""

    def __init__(self, arch: MoEArch, rope: InterleavedRotaryEmbedding):
        super().__init__()
        m, D, H = arch.mla, arch.hidden_size, arch.num_heads
        self.m, self.heads = m, H
        if m.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * m.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, m.q_lora_rank, bias=m.attention_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(m.q_lora_rank, H * m.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=m.attention_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(m.kv_lora_rank, H * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * m.v_head_dim, D, bias=m.attention_bias)
        self.rope = rope
        self.scale = m.qk_head_dim**-0.5 * softmax_mscale(arch.rope_scaling)

    def forward(self, x, positions, cache: torch.Tensor, meta: AttentionMetadata):
        m, T = self.m, x.shape[0]
        q = self.q_proj(x) if m.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(T, self.heads, m.qk_head_dim)
        q_nope, q_pe = q.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        q = torch.cat([q_nope, self.rope(q_pe, positions)], dim=-1)
        k_pe = self.rope(k_pe[:, None, :], positions)[:, 0]
        write_latent(c_kv, k_pe, cache, meta.slot_mapping)
        out = mla_attention_reference(q, cache, self.kv_b_proj.weight, meta, m.kv_lora_rank, m.v_head_dim, self.scale)
        return self.o_proj(out.reshape(T, self.heads * m.v_head_dim))


def route_deepseek(logits: torch.Tensor, top_k: int, routing: DeepseekRouting, norm_topk_prob: bool):
    """logits [T, E] (fp32) -> (ids [T, k], weights [T, k] fp32).

    Softmax over all experts; with n_group > 1 only experts of the `topk_group` groups with the highest best score
    compete (group_limited_greedy); top-k; then, as DeepSeek-V2's modeling code does, either renormalize to sum 1
    (norm_topk_prob, k > 1) or multiply by routed_scaling_factor.
    """
    scores = torch.softmax(logits, dim=-1, dtype=torch.float32)
    T, E = scores.shape
    G = routing.n_group
    if G > 1:
        group_best = scores.view(T, G, E // G).amax(dim=-1)  # [T, G]
        chosen = torch.topk(group_best, routing.topk_group, dim=-1).indices
        keep = torch.zeros_like(group_best, dtype=torch.bool).scatter_(1, chosen, True)
        scores = scores.masked_fill(~keep.repeat_interleave(E // G, dim=1), 0.0)
    weights, ids = torch.topk(scores, top_k, dim=-1)
    if norm_topk_prob and top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    else:
        weights = weights * routing.routed_scaling_factor
    return ids, weights


class DeepseekMoE(SparseMoE):
    """Routed experts in this rank's slots (w13, w2; through ExpertParallel) + shared experts, dense on every rank."""

    def __init__(self, arch: MoEArch, moe_index: int, num_local_slots: int):
        super().__init__(arch.hidden_size, arch.moe_intermediate_size, arch.num_experts, arch.top_k,
                         arch.norm_topk_prob, moe_index, num_local_slots)
        self.routing = arch.routing
        n_shared = arch.routing.n_shared_experts
        self.shared_experts = DenseMLP(arch.hidden_size, arch.moe_intermediate_size * n_shared) if n_shared else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = F.linear(x.float(), self.gate.weight.float())  # the router runs in fp32, like DeepSeek's
        ids, weights = route_deepseek(logits, self.top_k, self.routing, self.renormalize)
        return ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor, ep: ExpertParallel) -> torch.Tensor:
        ids, weights = self.route(x)
        out = ep.forward(self.moe_index, x, ids, weights, self.w13, self.w2, self.scales())
        return out if self.shared_experts is None else out + self.shared_experts(x)


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, arch: MoEArch, layer: int, rope: InterleavedRotaryEmbedding, num_local_slots: int):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = MLAttention(arch, rope)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        if layer in arch.dense_layers:
            self.mlp = DenseMLP(arch.hidden_size, arch.intermediate_size)
        else:
            self.mlp = DeepseekMoE(arch, arch.moe_layers.index(layer), num_local_slots)

    def forward(self, x, positions, cache, meta, ep: ExpertParallel):
        x = x + self.self_attn(self.input_layernorm(x), positions, cache, meta)
        h = self.post_attention_layernorm(x)
        return x + (self.mlp(h, ep) if isinstance(self.mlp, DeepseekMoE) else self.mlp(h))


class DeepseekV2ForCausalLM(nn.Module):
    def __init__(self, arch: MoEArch, num_local_slots: int, max_positions: int):
        super().__init__()
        if arch.mla is None or arch.routing is None:
            raise ValueError(f"{arch.kind} is not a DeepSeek-V2 architecture")
        self.arch = arch
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        rope = InterleavedRotaryEmbedding(arch.mla.qk_rope_head_dim, max_positions, arch.rope_theta, arch.rope_scaling)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(arch, i, rope, num_local_slots) for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, arch.vocab_size, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def _latent_width(self) -> int:
        return self.arch.mla.kv_lora_rank + self.arch.mla.qk_rope_head_dim

    def kv_cache_bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return self.arch.num_layers * block_size * self._latent_width * dtype.itemsize

    def make_kv_caches(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> list:
        """One latent cache per layer, [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]."""
        shape = (num_blocks, block_size, self._latent_width)
        return [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.arch.num_layers)]

    def moe_blocks(self) -> list[DeepseekMoE]:
        return [layer.mlp for layer in self.layers if isinstance(layer.mlp, DeepseekMoE)]

    @torch.inference_mode()
    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata, ep: ExpertParallel):
        """input_ids, positions [T] -> hidden [T, D]. Runs every layer even for T = 0 (MoE collectives)."""
        x = self.embed_tokens(input_ids)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, positions, cache, meta, ep)
        return self.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()
