"""engine.step_trace: a rank writes what it received and one line per step it ran, in order."""

from __future__ import annotations

import json

import httpx

from support import start_head


def test_step_trace_lists_the_request_then_its_prefill_and_decode_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("EEP_HPC_PROFILE_STEPS", "1")  # the first step with a batch under cProfile
    trace_dir = tmp_path / "trace"
    head = start_head(tmp_path / "run", engine={"step_trace": str(trace_dir)})
    try:
        prompt = [5, 6, 7, 8, 9, 10, 11]
        body = {"model": head.model, "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
        r = httpx.post(f"{head.url}/v1/completions", json=body, timeout=60)
    finally:
        head.stop()
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4, r.text
    lines = [json.loads(line) for line in (trace_dir / "rank-0.jsonl").read_text().splitlines()]
    add, = [r for r in lines if r["event"] == "add"]
    assert add["tokens"] == len(prompt)
    steps = [r for r in lines if r["event"] == "step" and r["t"] >= add["t"]]
    # the prompt in one step, then one token per step: 4 tokens from 4 steps that ran something
    ran = [s for s in steps if s["tokens"]]
    assert [s["tokens"] for s in ran] == [len(prompt), 1, 1, 1], ran
    assert all(s["step_ms"] >= 0 and s["agree_ms"] >= 0 for s in ran)
    assert [s["outputs"] for s in ran] == [1, 1, 1, 1]
    profile = (trace_dir / "rank-0-profile.txt").read_text()
    assert "rank_engine.py" in profile and "(step)" in profile, profile[:2000]
