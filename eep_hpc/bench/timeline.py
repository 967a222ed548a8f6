"""A run second by second, from the clients' own timestamps: output tokens per second, the p99 inter-token gap per
second, the ranks serving, and the scale events (the result JSON's `timeline`; bench/plot.py draws it).

Every time is in seconds since the first request was issued. A text chunk counts as its request's
output_tokens / chunks tokens (one chunk per decode step, so 1 unless the detokenizer held one back); the last,
partial second is scaled to a rate. A gap lands in the second it ended in. A scale event changes the rank count when its POST returned (the commit is at its end).
"""

from __future__ import annotations

import math

import numpy as np

from eep_hpc.bench.client import RequestResult


def token_times(r: RequestResult, origin: float) -> np.ndarray:
    """Arrival of each text chunk of a successful request, on the run's clock. [chunks]"""
    return r.start - origin + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])


def timeline(results: list[RequestResult], origin: float, duration: float, ranks_at_start: int | None,
             events: list[dict]) -> dict:
    """events: the scale plan's summaries with `t_s` (POST sent) and `t_done_s` (answered), on the run's clock;
    ranks_at_start None: not known (no access to /admin/state), no rank series."""
    seconds = max(1, math.ceil(duration))
    tokens = np.zeros(seconds)
    gaps: list[list[float]] = [[] for _ in range(seconds)]
    for r in results:
        if not r.success:
            continue
        times = token_times(r, origin)
        bins = np.clip(times.astype(int), 0, seconds - 1)
        np.add.at(tokens, bins, r.output_tokens / len(times))
        for b, gap in zip(bins[1:], r.itl):
            gaps[b].append(gap)
    last_width = duration - (seconds - 1)
    if 0 < last_width < 1:
        tokens[-1] /= last_width
    ranks = [[0.0, ranks_at_start]] if ranks_at_start else []
    for e in events if ranks else []:
        if e.get("phase") == "DONE":
            ranks.append([e["t_done_s"], e["to_ranks"]])
    return {
        "t_s": list(range(seconds)),  # the start of each one-second bin
        "output_tok_s": [round(float(x), 3) for x in tokens],
        "p99_itl_ms": [round(float(np.percentile(g, 99)) * 1000, 3) if g else None for g in gaps],
        "ranks": ranks,  # [t_s, member ranks from then on]
        "events": [{"kind": e.get("kind"), "phase": e.get("phase"), "from_ranks": e.get("from_ranks"),
                    "to_ranks": e.get("to_ranks"), "t_s": e["t_s"], "t_done_s": e["t_done_s"],
                    "commit_pause_ms": e.get("commit_pause_ms", 0.0)} for e in events],
        "duration_s": round(duration, 3),
    }
