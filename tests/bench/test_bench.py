"""`eep-hpc bench` against the real head: exact token counts, the result file, request-rate mode, a scale plan."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import numpy as np
import pytest

from eep_hpc.bench.cli import add_bench_parser
from eep_hpc.bench.client import RequestResult
from eep_hpc.bench.dataset import random_requests, token_range
from eep_hpc.bench.driver import run_load
from eep_hpc.bench.metrics import summarize
from eep_hpc.bench.progress import Progress
from eep_hpc.bench.scale_plan import parse_plan
from eep_hpc.bench.timeline import timeline
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
    assert parse_plan("2, rebalance,1") == [2, "rebalance", 1]
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


@pytest.mark.parametrize("client", ["lean", "httpx"])
def test_bench_concurrency_limited_run_writes_result(api, tmp_path, capsys, client):
    code, result = run(tmp_path, api.url, "--num-prompts", "12", "--random-input-len", "16",
                       "--random-output-len", "8", "--max-concurrency", "4", "--http-client", client)
    assert code == 0 and result["http_client"] == client
    assert [k for k in RESULT_KEYS if k not in result] == []
    assert result["completed"] == 12 and result["failed"] == 0 and result["failed_requests"] == []
    assert result["total_input_tokens"] == 12 * 16 and result["total_output_tokens"] == 12 * 8
    assert result["model"] == api.model and result["max_concurrency"] == 4 and result["request_rate"] == "inf"
    assert result["workload"] == "random 16 in / 8 out, 12 prompts"
    assert result["scale_events"] == [] and result["num_gpus"] == 0
    assert 0 < result["mean_ttft_ms"] <= result["mean_e2el_ms"] and result["mean_tpot_ms"] > 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Successful requests:" in printed


def test_bench_without_matplotlib_says_how_to_get_the_picture(api, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    code, result = run(tmp_path, api.url, "--num-prompts", "2", "--random-input-len", "8", "--random-output-len", "4",
                       "--timeline", str(tmp_path / "t.png"))
    assert code == 0 and result["completed"] == 2 and result["timeline"]["ranks"] == [[0.0, 1]]
    assert not (tmp_path / "t.png").exists()
    err = [line for line in capsys.readouterr().err.splitlines() if "timeline" in line]
    assert err == ["bench: no timeline picture without matplotlib: pip install 'eep-hpc[plot]' (matplotlib)"]


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


@pytest.mark.parametrize("client", ["lean", "httpx"])
def test_a_failed_request_reports_the_servers_error(api, tmp_path, capsys, client):
    args = parse("--url", api.url, "--model", "no-such-model", "--num-prompts", "2", "--random-input-len", "8",
                 "--random-output-len", "4", "--http-client", client, "--result-file", str(tmp_path / "r.json"))
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "the first test request failed: HTTP 404" in err and "no-such-model" in err, err


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
        # the timeline: every output token in some second, the ranks stepping 1 -> 2 -> 1 where the events ended
        tl = result["timeline"]
        width = tl["duration_s"] - tl["t_s"][-1]
        assert sum(tl["output_tok_s"][:-1]) + tl["output_tok_s"][-1] * width == pytest.approx(
            result["total_output_tokens"], rel=1e-3)
        assert tl["ranks"] == [[0.0, 1], [events[0]["t_done_s"], 2], [events[1]["t_done_s"], 1]]
        assert 0 < events[0]["t_s"] < events[0]["t_done_s"] < events[1]["t_s"] < tl["duration_s"]
        assert max(x for x in tl["p99_itl_ms"] if x is not None) >= result["p99_itl_ms"] * 0.99
        picture = tmp_path / "result.png"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size > 10_000
    finally:
        head.stop()


def test_timeline_bins_tokens_and_gaps_by_second_and_steps_the_ranks():
    # two requests sent at 0.0 and 0.5 s of the run (origin 100.0): chunks at 0.2, 0.4, 1.4 / 0.6, 1.1, 1.2 s
    a = RequestResult(4, output_tokens=3, ttft=0.2, itl=[0.2, 1.0], e2e=1.5, start=100.0)
    b = RequestResult(4, output_tokens=6, ttft=0.1, itl=[0.5, 0.1], e2e=0.8, start=100.5)  # 2 tokens per chunk
    failed = RequestResult(4, error="HTTP 500: boom", start=100.0)
    events = [{"kind": "grow", "phase": "DONE", "from_ranks": 1, "to_ranks": 2, "t_s": 0.3, "t_done_s": 0.9,
               "commit_pause_ms": 12.0},
              {"kind": "shrink", "phase": "ROLLED_BACK", "from_ranks": 2, "to_ranks": 1, "t_s": 1.0,
               "t_done_s": 1.3, "commit_pause_ms": 0.0}]
    tl = timeline([a, b, failed], origin=100.0, duration=1.5, ranks_at_start=1, events=events)
    assert tl["t_s"] == [0, 1]
    # second 0: a's two chunks (1 + 1) and b's first (2); second 1 (0.5 s long): a's last (1) and b's two (4)
    assert tl["output_tok_s"] == [4.0, 10.0]
    # gaps ending in second 0: 0.2; in second 1: 1.0, 0.5, 0.1
    assert tl["p99_itl_ms"][0] == pytest.approx(200.0)
    assert tl["p99_itl_ms"][1] == pytest.approx(1000 * float(np.percentile([1.0, 0.5, 0.1], 99)))
    assert tl["ranks"] == [[0.0, 1], [0.9, 2]]  # the rolled-back shrink changed nothing
    assert [(e["kind"], e["t_s"], e["t_done_s"]) for e in tl["events"]] == [("grow", 0.3, 0.9), ("shrink", 1.0, 1.3)]
    assert timeline([a], 100.0, 1.5, None, events)["ranks"] == []  # rank count not known: no series


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise():
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    for stream in (Terminal(), io.StringIO()):
        progress = Progress(3, stream=stream, every_s=3600)
        for ok in (True, False, True, True):  # one more than asked: the scale plan kept the load going
            progress.started()
            progress.finished(ok)
        progress.note("bench: scale grow 1 -> 2 ranks")
        progress.close()
        out = stream.getvalue()
        if isinstance(stream, Terminal):
            assert "\r" in out and "4req" in out and "1 failed, 0 in flight" in out, out
            assert "\nbench: scale grow 1 -> 2 ranks\n" in out.replace("\r", "\n"), out
        else:
            assert "\r" not in out, out
            assert out.splitlines() == ["bench: scale grow 1 -> 2 ranks",
                                        out.splitlines()[-1]], out  # every_s not reached: the closing line only
            assert out.splitlines()[-1].startswith("bench: 4 (3 + more while the scale plan runs) done, 1 failed, "
                                                   "0 in flight"), out
