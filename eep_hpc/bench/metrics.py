"""The summary of a run, with the keys of `vllm bench serve`'s JSON.

Like vLLM: token totals and latencies count successful requests only; TPOT per request is
(e2e - ttft) / (output_tokens - 1) for requests with more than one output token; ITL pools the gaps of every
request; times are in milliseconds; an empty list gives 0.
"""

from __future__ import annotations

import math

import numpy as np

from eep_hpc.bench.client import RequestResult

PERCENTILES = (99,)
LATENCIES = ("ttft", "tpot", "itl", "e2el")


def stats(name: str, seconds: list[float]) -> dict:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0 if seconds else np.zeros(1)
    out = {f"mean_{name}_ms": float(np.mean(ms)), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(np.std(ms))}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(results: list[RequestResult], duration: float, request_rate: float,
              max_concurrency: int | None) -> dict:
    ok = [r for r in results if r.success]
    input_tokens = sum(r.input_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.e2e for r in ok],
    }
    per_s = 1.0 / duration if duration > 0 else 0.0
    out = {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) * per_s,
        "output_throughput": output_tokens * per_s,
        "total_token_throughput": (input_tokens + output_tokens) * per_s,
        "max_concurrency": max_concurrency,
        "request_rate": request_rate if math.isfinite(request_rate) else "inf",
    }
    for name in LATENCIES:
        out.update(stats(name, samples[name]))
    return out
