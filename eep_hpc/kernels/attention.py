"""Paged attention over a block-structured KV cache: per-step metadata and the torch reference (CPU, tests).

The Triton path (`triton_attention.py`) reads the same metadata; `ops.paged_attention` picks between them.

One call serves a mixed batch: each sequence b contributes `query_lens[b]` new tokens (a prefill chunk or one
decode token) whose keys/values are first written into the cache, then attends causally to all of its
`seq_lens[b]` cached tokens. Shapes: T packed new tokens, B sequences, Hq/Hkv heads, D head dim.
"""

from __future__ import annotations

import array
import itertools
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F


@dataclass
class ReferenceIndex:
    """Padded gather/mask tensors for the torch reference; built on first use, shared by every layer of a step."""

    kv_index: torch.Tensor  # [B, Lk] slot of each key position (0 where padded)
    mask: torch.Tensor  # [B, 1, Lq, Lk] bool: query i of b may see key j
    token_batch: torch.Tensor  # [T] sequence of each packed token
    token_row: torch.Tensor  # [T] its row within the padded query block


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] long: cache slot receiving each new token's k/v
    query_start_loc: torch.Tensor  # [B + 1] long (cpu)
    seq_lens: torch.Tensor  # [B] long (cpu): tokens in the cache after this step
    block_tables: torch.Tensor  # [B, max_blocks] long, padded with 0
    block_size: int
    # For the Triton kernels, on the step's device (slot_mapping, these two and block_tables travel in one copy):
    query_start_loc_device: torch.Tensor  # [B + 1] long
    seq_lens_device: torch.Tensor  # [B] long
    max_query_len: int
    max_seq_len: int
    block_tables_host: torch.Tensor  # [B, max_blocks] long (cpu), for the reference's padded index

    @property
    def num_tokens(self) -> int:
        return int(self.slot_mapping.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

    @staticmethod
    def build(
        slot_mapping: list[int],
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device,
    ) -> "AttentionMetadata":
        B, T = len(query_lens), len(slot_mapping)
        width = max(1, max((len(t) for t in block_tables), default=0))
        # one flat host list -> one tensor -> one host-to-device copy: [slots | query_start_loc | seq_lens | tables],
        # each part starting on a 16-byte boundary (an even index): Triton compiles a kernel once per alignment of
        # its pointers, so parts at offsets that follow T and B made new variants mid-serving (a burst's first
        # steps waited on the JIT)
        flat = list(slot_mapping) + [0] * (T % 2)
        flat += itertools.accumulate(query_lens, initial=0)
        flat += [0] * ((B + 1) % 2)
        flat += seq_lens
        flat += [0] * (B % 2)
        for t in block_tables:
            flat += t
            flat += [0] * (width - len(t))
        host = torch.frombuffer(array.array("q", flat), dtype=torch.long)  # ~4x faster than torch.tensor(list)
        dev = host.to(device)
        q0 = T + T % 2
        s0 = q0 + B + 1 + (B + 1) % 2
        t0 = s0 + B + B % 2
        return AttentionMetadata(
            slot_mapping=dev[:T],
            query_start_loc=host[q0 : q0 + B + 1],
            seq_lens=host[s0 : s0 + B],
            block_tables=dev[t0:].view(B, width),
            block_size=block_size,
            query_start_loc_device=dev[q0 : q0 + B + 1],
            seq_lens_device=dev[s0 : s0 + B],
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            block_tables_host=host[t0:].view(B, width),
        )

    @cached_property
    def reference(self) -> ReferenceIndex:
        B, device, block_size = self.num_seqs, self.block_tables.device, self.block_size
        tables = self.block_tables_host
        seq = self.seq_lens
        qlen = self.query_start_loc[1:] - self.query_start_loc[:-1]
        lq, lk = self.max_query_len, self.max_seq_len
        pos = torch.arange(lk)
        kv_index = tables.gather(1, (pos // block_size).clamp(max=tables.shape[1] - 1).expand(B, lk))
        kv_index = kv_index * block_size + pos % block_size
        # query row i of sequence b sits at absolute position seq_len - query_len + i
        q_pos = (seq - qlen)[:, None] + torch.arange(lq)[None, :]  # [B, Lq]
        mask = pos[None, None, :] <= q_pos[:, :, None]  # [B, Lq, Lk] causal within the cached sequence
        mask &= (torch.arange(lq)[None, :] < qlen[:, None])[:, :, None]
        if lk:
            mask[:, :, 0] |= ~mask.any(-1)  # padded query rows see one key so softmax stays finite
        token_batch = torch.repeat_interleave(torch.arange(B), qlen)
        starts = torch.cumsum(qlen, 0) - qlen
        token_row = torch.arange(int(qlen.sum())) - starts[token_batch]
        return ReferenceIndex(
            kv_index=kv_index.to(device),
            mask=mask[:, None].to(device),
            token_batch=token_batch.to(device),
            token_row=token_row.to(device),
        )

    # the reference's fields, under their old names
    kv_index = property(lambda self: self.reference.kv_index)
    mask = property(lambda self: self.reference.mask)
    token_batch = property(lambda self: self.reference.token_batch)
    token_row = property(lambda self: self.reference.token_row)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor):
    """k, v [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at flat slots [T]."""
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v


def paged_attention_reference(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata, scale: float
) -> torch.Tensor:
    """q [T, Hq, D] -> [T, Hq, D], attending over the cache (new tokens already written)."""
    T, Hq, D = q.shape
    if T == 0:
        return q.new_empty(0, Hq, D)
    B, lq = meta.mask.shape[0], meta.mask.shape[2]
    keys = k_cache.view(-1, *k_cache.shape[2:])[meta.kv_index]  # [B, Lk, Hkv, D]
    values = v_cache.view(-1, *v_cache.shape[2:])[meta.kv_index]
    q_pad = q.new_zeros(B, lq, Hq, D)
    q_pad[meta.token_batch, meta.token_row] = q
    out = F.scaled_dot_product_attention(
        q_pad.transpose(1, 2),
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=meta.mask,
        scale=scale,
        enable_gqa=True,
    )  # [B, Hq, Lq, D]
    return out.transpose(1, 2)[meta.token_batch, meta.token_row]
