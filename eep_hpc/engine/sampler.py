"""Pick the next token of each sequence from its logits.

Penalties first (presence, frequency, repetition: engine/penalties.py). Then temperature 0 → argmax. Otherwise
logits / temperature, top-k (0 = off), top-p (the smallest set of most likely tokens whose probability reaches p; at
least one token), softmax, and one multinomial draw.

A seeded request draws with its own generator, reseeded from (seed, number of output tokens) before every draw: its
tokens depend neither on its batch neighbours nor on preemption, and a request migrated to another rank (which
arrives with its output tokens) continues the same random stream. Unseeded rows share `default_generator`.

Logprobs (`logprobs`) are of the model's raw distribution: log_softmax of the logits as the model produced them,
before min_tokens masking, penalties, temperature, top-k and top-p (vLLM's default `raw_logprobs`). They are
computed only for rows whose request asked for them.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from eep_hpc.engine.device_lists import device_tensor
from eep_hpc.engine.penalties import apply_penalties
from eep_hpc.engine.sequence import Sequence
from eep_hpc.protocol import Logprobs

_GREEDY_BELOW = 1e-5  # temperatures under this are greedy
_MASK64 = 0xFFFF_FFFF_FFFF_FFFF


def step_seed(seed: int, step: int) -> int:
    """A 64-bit seed for draw number `step` of a request seeded with `seed` (splitmix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def sample(
    logits: torch.Tensor,  # [B, V] float32
    seqs: list[Sequence],
    default_generator: torch.Generator,
    eos_token_ids: Collection[int] = (),
) -> list[int]:
    """One token per row. With eos_token_ids, rows below min_tokens cannot draw eos or their stop tokens."""
    assert logits.dim() == 2 and logits.shape[0] == len(seqs), f"logits {tuple(logits.shape)} for {len(seqs)} seqs"
    logits = _mask_stop_tokens_before_min(logits, seqs, eos_token_ids)
    logits = apply_penalties(logits, seqs)
    temps = [s.sampling.temperature for s in seqs]
    greedy = [i for i, t in enumerate(temps) if t < _GREEDY_BELOW]
    random = [i for i, t in enumerate(temps) if t >= _GREEDY_BELOW]
    if not random:
        return logits.argmax(dim=-1).tolist()
    tokens = torch.empty(len(seqs), dtype=torch.long, device=logits.device)  # [B]
    if greedy:
        rows = device_tensor(greedy, torch.long, logits.device)
        tokens[rows] = logits[rows].argmax(dim=-1)
    if random:
        rows = device_tensor(random, torch.long, logits.device)
        probs = _probs(logits[rows], [seqs[i].sampling for i in random])  # [R, V]
        unseeded = [j for j, i in enumerate(random) if seqs[i].sampling.seed is None]
        if unseeded:
            sel = device_tensor(unseeded, torch.long, logits.device)
            tokens[rows[sel]] = torch.multinomial(probs[sel], 1, generator=default_generator).squeeze(1)
        for j, i in enumerate(random):
            seq = seqs[i]
            if seq.sampling.seed is not None:
                gen = _generator_on(seq, logits.device)
                gen.manual_seed(step_seed(seq.sampling.seed, seq.num_output_tokens))
                tokens[i] = torch.multinomial(probs[j], 1, generator=gen)[0]
    return tokens.tolist()


def _probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    """[R, V] logits → [R, V] probabilities after temperature, top-k and top-p."""
    device = logits.device
    temperature = device_tensor([p.temperature for p in params], logits.dtype, device)  # [R]
    logits = logits / temperature.unsqueeze(1)
    top_k = [p.top_k for p in params]
    top_p = [p.top_p for p in params]
    if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
        logits = _top_k_top_p(logits, top_k, top_p)
    return logits.softmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    V = logits.shape[1]
    device = logits.device
    sorted_logits, order = logits.sort(dim=-1)  # [R, V] ascending
    k = device_tensor([k if 0 < k < V else V for k in top_k], torch.long, device)  # [R]
    rank_from_top = torch.arange(V - 1, -1, -1, device=device)  # [V]: V-1 for the smallest
    sorted_logits = sorted_logits.masked_fill(rank_from_top.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))
    p = device_tensor(top_p, logits.dtype, device)  # [R]
    tail_mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [R, V]: mass of this token and all smaller ones
    drop = tail_mass <= (1 - p).unsqueeze(1)  # the mass above already reaches p
    drop[:, -1] = False  # keep the most likely token
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def _mask_stop_tokens_before_min(
    logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Collection[int]
) -> torch.Tensor:
    masked = None
    for i, seq in enumerate(seqs):
        sp = seq.sampling
        if seq.num_output_tokens >= sp.min_tokens:
            continue
        banned = list(sp.stop_token_ids) + ([] if sp.ignore_eos else list(eos_token_ids))
        if banned:
            masked = logits.clone() if masked is None else masked
            masked[i, banned] = float("-inf")
    return logits if masked is None else masked


def _generator_on(seq: Sequence, device: torch.device) -> torch.Generator:
    if seq.generator is None or seq.generator.device != device:
        seq.generator = torch.Generator(device=device)
    return seq.generator


def sampled_logprobs(
    logits: torch.Tensor,  # [R, V] raw logits
    token_ids: list[int],  # [R] the token whose logprob each row reports
    top_k: list[int],  # [R] how many most likely tokens each row lists (0..V)
) -> list[Logprobs]:
    """One Logprobs of one token per row (see the module docstring: raw distribution)."""
    lp, top_ids, top_lp = _logprobs(logits, token_ids, max(top_k, default=0))
    return [
        Logprobs(token_logprobs=[lp[r]], top_ids=[top_ids[r][:k]], top_logprobs=[top_lp[r][:k]])
        for r, k in enumerate(top_k)
    ]


def logprobs_of_tokens(logits: torch.Tensor, token_ids: list[int], top_k: int) -> Logprobs:
    """Logprobs of consecutive tokens: row r of logits [R, V] predicts token_ids[r]; top_k most likely per row."""
    lp, top_ids, top_lp = _logprobs(logits, token_ids, top_k)
    return Logprobs(token_logprobs=lp, top_ids=top_ids, top_logprobs=top_lp)


def _logprobs(logits: torch.Tensor, token_ids: list[int], k: int):
    assert logits.dim() == 2 and logits.shape[0] == len(token_ids), f"{tuple(logits.shape)} for {len(token_ids)}"
    lp = torch.log_softmax(logits.float(), dim=-1)  # [R, V]
    ids = torch.tensor(token_ids, dtype=torch.long, device=lp.device)
    chosen = lp.gather(1, ids.unsqueeze(1)).squeeze(1).tolist()  # [R]
    k = min(k, lp.shape[1])
    if k <= 0:
        return chosen, [[] for _ in token_ids], [[] for _ in token_ids]
    top = lp.topk(k, dim=-1)  # sorted, most likely first
    return chosen, top.indices.tolist(), top.values.tolist()
