"""Presence, frequency and repetition penalties on a batch's logits, as vLLM applies them.

For each row with counts c[v] of token v among its *output* tokens so far, and `seen` = v is in its prompt or output:
    repetition (r > 0):   logits[v] / r if logits[v] > 0 else logits[v] * r     where seen (1 = off)
    frequency (f):        logits[v] -= f * c[v]                                   (0 = off)
    presence (p):         logits[v] -= p * (c[v] > 0)                             (0 = off)
in that order (vLLM v1's `apply_penalties`). The counts are built on the logits' device with one scatter_add per
kind over the rows' token ids, padded with the id V (a column that is cut off). Only rows that ask for a penalty are
touched; a batch where none does costs one Python pass over its sampling params.
"""

from __future__ import annotations

import torch

from eep_hpc.engine.sequence import Sequence
from eep_hpc.protocol import SamplingParams


def has_penalties(sp: SamplingParams) -> bool:
    return sp.presence_penalty != 0 or sp.frequency_penalty != 0 or sp.repetition_penalty != 1


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """[B, V] logits of `seqs` -> the same with each row's penalties applied (a new tensor where any applies)."""
    rows = [i for i, s in enumerate(seqs) if has_penalties(s.sampling)]
    if not rows:
        return logits
    device, V = logits.device, logits.shape[1]
    picked = [seqs[i] for i in rows]
    output_counts = token_counts([s.output_token_ids for s in picked], V, device)  # [R, V]
    prompt_seen = token_counts([s.prompt_token_ids for s in picked], V, device) > 0  # [R, V]
    params = [s.sampling for s in picked]
    rep = torch.tensor([p.repetition_penalty for p in params], dtype=logits.dtype, device=device).unsqueeze(1)
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=device).unsqueeze(1)

    index = torch.tensor(rows, dtype=torch.long, device=device)
    sub = logits.index_select(0, index)  # [R, V]
    output_seen = output_counts > 0
    penalty = torch.where(prompt_seen | output_seen, rep, torch.ones_like(rep))  # [R, V]
    sub = torch.where(sub > 0, sub / penalty, sub * penalty)
    sub = sub - freq * output_counts.to(logits.dtype) - pres * output_seen.to(logits.dtype)
    return logits.index_copy(0, index, sub)


def token_counts(token_ids: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """[R, V] int64: how often each token id occurs in each row's list."""
    width = max((len(t) for t in token_ids), default=0)
    padded = torch.full((len(token_ids), width), vocab_size, dtype=torch.long)
    for r, ids in enumerate(token_ids):
        if ids:
            padded[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    padded = padded.to(device, non_blocking=True)
    counts = torch.zeros(len(token_ids), vocab_size + 1, dtype=torch.long, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded))
    return counts[:, :vocab_size]
