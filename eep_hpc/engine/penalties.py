"""Presence, frequency and repetition penalties on a batch's logits, as vLLM applies them.

For each row with counts c[v] of token v among its *output* tokens so far, and `seen` = v is in its prompt or output:
    repetition (r > 0):   logits[v] / r if logits[v] > 0 else logits[v] * r     where seen (1 = off)
    frequency (f):        logits[v] -= f * c[v]                                   (0 = off)
    presence (p):         logits[v] -= p * (c[v] > 0)                             (0 = off)
in that order (vLLM v1's `apply_penalties`). Only the columns of tokens a row has seen change, so the work goes over
its token ids, not over the vocabulary: gather those columns, change them, scatter them back. A token id that occurs
k times is written k times with the same value (repetition, presence), or gets -f added k times (frequency: the
addends are equal, so their order, which CUDA's atomics do not fix, cannot change the sum). Rows are padded with
the id V, a column past the vocabulary that is dropped. Only rows that ask for a penalty are touched; a batch where
none does costs one Python pass over its sampling params.

CUDA graphs: this runs eagerly on the logits a step produced (engine/model_runner.py computes them after a decode
graph's replay), never inside a capture, so the index tensors it builds from each row's token lists every step need
no static buffers, and a batch with penalised rows replays its decode graph like any other (checked on a GPU by
tests/serve/test_penalties.py).
"""

from __future__ import annotations

import torch

from eep_hpc.engine.device_lists import device_tensor, to_device
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
    params = [s.sampling for s in picked]

    def column(values: list[float]) -> torch.Tensor:  # [R, 1]
        return device_tensor(values, logits.dtype, device).unsqueeze(1)

    rep, freq, pres = (column([p.repetition_penalty for p in params]), column([p.frequency_penalty for p in params]),
                       column([p.presence_penalty for p in params]))
    seen = padded_ids([s.prompt_token_ids + s.output_token_ids for s in picked], V, device)  # [R, P + O]
    output = padded_ids([s.output_token_ids for s in picked], V, device)  # [R, O]

    index = device_tensor(rows, torch.long, device)
    work = torch.cat([logits.index_select(0, index), logits.new_zeros(len(rows), 1)], dim=1)  # [R, V + 1]
    x = work.gather(1, seen)
    work.scatter_(1, seen, torch.where(x > 0, x / rep, x * rep))
    work.scatter_add_(1, output, (-freq).expand(output.shape))
    work.scatter_(1, output, work.gather(1, output) - pres)
    return logits.index_copy(0, index, work[:, :V])


def padded_ids(token_ids: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[R, longest] int64 on `device`: each row's ids, then `pad`."""
    width = max((len(t) for t in token_ids), default=0)
    padded = torch.full((len(token_ids), width), pad, dtype=torch.long)
    for r, ids in enumerate(token_ids):
        if ids:
            padded[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return to_device(padded, device)
