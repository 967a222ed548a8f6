"""The per-request tally of per-token metrics (serve/metrics.py, RequestTracker) renders exactly what one observe()
and inc() per output would have: counts and every bucket, the sum up to float rounding (added in another grouping),
whether it flushes midway or only at the end."""

from __future__ import annotations

from prometheus_client import generate_latest

from eep_hpc.serve import metrics as M

FAMILIES = ("eep_hpc:inter_token_latency_seconds", "eep_hpc:generation_tokens")


def families(api: M.ApiMetrics) -> list[str]:
    return [line for line in generate_latest(api.registry).decode().splitlines()
            if line.startswith(FAMILIES) and not line.startswith("#") and "_created" not in line]


def test_tally_renders_what_observing_each_output_renders(monkeypatch):
    # gaps across the buckets, on the bounds themselves, past the last; several tokens in one output
    outputs = [(0.0, 1), (0.0004, 1), (0.001, 1), (0.0011, 2), (0.3, 1), (0.02, 3), (12.0, 1)] * 11
    tallied, direct = M.ApiMetrics("m"), M.ApiMetrics("m")
    clock = [100.0]
    monkeypatch.setattr(M.time, "monotonic", lambda: clock[0])
    tracker = tallied.track(arrival=99.0, prompt_len=5)
    last = None
    for gap, count in outputs:
        clock[0] += gap
        tracker.tokens(count)
        if last is None:
            direct.ttft_of_model.observe(clock[0] - 99.0)
        else:
            direct.itl_of_model.observe((clock[0] - last) / count)
        direct.generation_tokens_of_model.inc(count)
        last = clock[0]
    assert len(outputs) > 2 * M.FLUSH_EVERY  # flushed midway as well as at the end
    tracker.finish("length")
    sums = [[float(line.rsplit(" ", 1)[1]) for line in families(api) if "_sum{" in line] for api in (tallied, direct)]
    assert len(sums[0]) == 1 and abs(sums[0][0] - sums[1][0]) < 1e-9
    assert [x for x in families(tallied) if "_sum{" not in x] == [x for x in families(direct) if "_sum{" not in x]
    assert any("generation_tokens_total" in line and line.endswith(f" {sum(c for _, c in outputs)}.0")
               for line in families(tallied))
