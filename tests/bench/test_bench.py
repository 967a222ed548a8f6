"""`eep-hpc bench` against the real head: exact token counts, the result file, request-rate mode, a scale plan."""

from __future__ import annotations

import argparse
import asyncio
import json

import numpy as np
import pytest

from eep_hpc.bench.cli import add_bench_parser
from eep_hpc.bench.client import RequestResult
from eep_hpc.bench.dataset import random_requests, token_range
from eep_hpc.bench.driver import run_load
from eep_hpc.bench.metrics import summarize
from eep_hpc.bench.scale_plan import parse_plan
from support import start_head

RESULT_KEYS = [
    "completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
    "output_throughput", "total_token_throughput", "max_concurrency", "request_rate",
    *(f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99", "std")),
    "device", "num_gpus", "model", "dtype", "workload", "command", "date", "failed_requests", "scale_events",
]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="eep-hpc")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["bench", *argv])


def run(tmp_path, url: str, *argv: str) -> tuple[int, dict]:
    out = tmp_path / "result.json"
    args = parse("--url", url, "--result-file", str(out), *argv)
    code = args.func(args)
    return code, json.loads(out.read_text())


def test_random_requests_have_exact_lengths_and_safe_ids():
    reqs = random_requests(50, 16, 8, 0.5, 500, seed=3)
    assert reqs == random_requests(50, 16, 8, 0.5, 500, seed=3)
    assert all(8 <= r.input_len <= 24 and 4 <= r.output_len <= 12 for r in reqs)
    assert len({r.input_len for r in reqs}) > 1
    low, high = token_range(500)
    ids = np.concatenate([r.prompt for r in reqs])
    assert ids.min() >= low >= 3 and ids.max() < high <= 500  # the tiny model's special tokens are ids 0..2
    assert {r.input_len for r in random_requests(5, 16, 8, 0.0, 500)} == {16}


def test_scale_plan_parsing():
    assert parse_plan("1,2,4,2,1") == [1, 2, 4, 2, 1]
    for bad in ("", "1,0", "a,b"):
        with pytest.raises(ValueError):
            parse_plan(bad)


def test_summary_counts_only_successful_requests():
    ok = RequestResult(10, output_tokens=5, ttft=0.1, itl=[0.05] * 4, e2e=0.3)
    bad = RequestResult(10, error="HTTP 500: boom")
    m = summarize([ok, ok, bad], duration=2.0, request_rate=float("inf"), max_concurrency=None)
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (2, 1, 20, 10)
    assert m["mean_tpot_ms"] == pytest.approx(50.0) and m["mean_itl_ms"] == pytest.approx(50.0)
    assert m["output_throughput"] == pytest.approx(5.0) and m["request_rate"] == "inf"


def test_load_keeps_going_until_the_plan_is_done():
    async def main():
        in_flight = peak = 0

        async def send(req):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.01)
            in_flight -= 1
            return RequestResult(req.input_len, output_tokens=req.output_len)

        plan = asyncio.ensure_future(asyncio.sleep(0.3))
        outcome = await run_load(send, random_requests(4, 4, 2, 0.0, 500), max_concurrency=2, keep_going=plan)
        assert plan.done() and len(outcome.results) > 4 and peak <= 2
        outcome = await run_load(send, random_requests(4, 4, 2, 0.0, 500), request_rate=1000.0)
        assert len(outcome.results) == 4

    asyncio.run(main())


def test_bench_concurrency_limited_run_writes_result(api, tmp_path, capsys):
    code, result = run(tmp_path, api.url, "--num-prompts", "12", "--random-input-len", "16",
                       "--random-output-len", "8", "--max-concurrency", "4")
    assert code == 0
    assert [k for k in RESULT_KEYS if k not in result] == []
    assert result["completed"] == 12 and result["failed"] == 0 and result["failed_requests"] == []
    assert result["total_input_tokens"] == 12 * 16 and result["total_output_tokens"] == 12 * 8
    assert result["model"] == api.model and result["max_concurrency"] == 4 and result["request_rate"] == "inf"
    assert result["workload"] == "random 16 in / 8 out, 12 prompts"
    assert result["scale_events"] == [] and result["num_gpus"] == 0
    assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"] and result["mean_tpot_ms"] > 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Successful requests:" in printed


def test_bench_request_rate_mode_and_default_result_path(api, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = parse("--url", api.url, "--num-prompts", "6", "--random-input-len", "8", "--random-output-len", "4",
                 "--random-range-ratio", "0.5", "--request-rate", "20", "--dtype-label", "fp32")
    assert args.func(args) == 0
    [path] = (tmp_path / "runs" / "local" / "bench").glob("*.json")
    assert path.name.endswith(f"-{api.model}.json")
    result = json.loads(path.read_text())
    assert result["completed"] == 6 and result["failed"] == 0 and result["request_rate"] == 20.0
    assert result["dtype"] == "fp32" and result["max_concurrency"] is None


def test_bench_refuses_lengths_beyond_the_context(api, tmp_path):
    # prompt + output beyond the model's context: the first test request fails and the run does not start
    args = parse("--url", api.url, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "100000",
                 "--result-file", str(tmp_path / "r.json"))
    assert args.func(args) == 2
    assert not (tmp_path / "r.json").exists()


def test_bench_scale_plan_under_load(tmp_path):
    head = start_head(tmp_path / "run", ranks=1)
    try:
        code, result = run(tmp_path, head.url, "--num-prompts", "8", "--random-input-len", "16",
                           "--random-output-len", "16", "--max-concurrency", "4", "--scale-plan", "1,2,1",
                           "--scale-interval", "0.5")
        assert result["failed_requests"] == [] and result["failed"] == 0 and code == 0
        assert result["completed"] >= 8
        assert result["total_output_tokens"] == result["completed"] * 16
        events = result["scale_events"]
        assert [(e["kind"], e["from_ranks"], e["to_ranks"], e["phase"]) for e in events] == [
            ("grow", 1, 2, "DONE"), ("shrink", 2, 1, "DONE")]
        assert len(head.state()["members"]) == 1
    finally:
        head.stop()
