"""The head's benchmark: stand-in ranks (the real rank process without a model) behind the real head, and
`eep-hpc bench-head` driving lean streaming clients against it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import httpx

from eep_hpc.bench.head_bench import prompt_ids
from eep_hpc.bench.sse_client import Connection
from support import pid_of, start_head, until, wait_for_event


def test_standin_ranks_stream_every_token_of_every_request(tmp_path):
    """Two stand-in ranks in one epoch (a real gloo group, waves, signed messages): 48 streams at once, each gets
    exactly max_tokens tokens, its prompt's tokens over again, then finish_reason "length"."""
    emit = tmp_path / "emit"
    head = start_head(tmp_path, ranks=2, parallel={"rank_engine": "standin"},
                      standin={"steps_per_s": 200.0, "emit_log": str(emit)}, engine={"max_num_seqs": 16})
    try:
        host, port = head.url.split("//")[1].rsplit(":", 1)
        prompt = prompt_ids(512, 5)
        pieces = [len(head.tokenizer.decode([t])) for t in prompt]

        async def one(i: int):
            conn = Connection(host, int(port))
            try:
                body = {"model": head.model, "prompt": prompt, "max_tokens": 7 + i % 5, "temperature": 0.0,
                        "stream": True, "stream_options": {"include_usage": True}}
                return await conn.complete(body, keep_text=True, piece_chars=pieces)
            finally:
                conn.close()

        async def all_streams():
            return await asyncio.gather(*(one(i) for i in range(48)))

        results = asyncio.run(all_streams())
        assert [r.error for r in results if r.error] == []
        for i, r in enumerate(results):
            n = 7 + i % 5
            expected = [prompt[k % len(prompt)] for k in range(n)]
            assert r.finish_reason == "length"
            assert r.completion_tokens == n
            assert r.text == head.tokenizer.decode(expected)
            assert len(r.received_at) == n  # a time per token (an event may carry several, counted by text)
        state = head.state()
        assert sorted(state["members"]) == [0, 1]
        # both ranks served (requests are routed by load), and wrote when they emitted each token
        emitted = {}
        for path in emit.glob("rank-*.jsonl"):
            lines = [json.loads(line) for line in path.read_text().splitlines()]
            assert lines, f"{path.name} served nothing"
            emitted.update(dict(lines))
        assert {f"{r.request_id}-0" for r in results} <= set(emitted)
        assert all(len(emitted[f"{r.request_id}-0"]) == len(r.received_at) for r in results)
    finally:
        head.stop()


def test_bench_head_command_reports_zero_failures(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "eep_hpc.cli", "bench-head", "--standin-ranks", "2", "--streams", "24",
           "--output-len", "12", "--rounds", "2", "--steps-per-s", "100", "--run-dir", str(tmp_path / "run"),
           "--result-file", str(out), "--head-cpu", "0", "--client-cpu", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["failed"] == 0 and run["requests"] == 48
    # stream i's first request has ceil((i + 1) * 12 / 24) tokens, the second 12
    assert run["tokens"] == sum(-(-(i + 1) * 12 // 24) + 12 for i in range(24))
    assert run["added_delay_ms"]["count"] == run["tokens"]
    # the API process's send times, per token: after the emit, and before the client's receive (up to 1 ms: the
    # clients date a token by when its text is complete, the head by the chunk that counted it)
    head, client = run["head_added_delay_ms"], run["added_delay_ms"]
    assert head["count"] == run["tokens"] and 0 <= head["p50"] <= client["p50"] + 1.0
    assert head["max"] <= client["max"] + 1.0
    assert run["head_cpu_s"] > 0 and run["delivered_tok_s"] > 0


def test_bench_head_with_two_api_processes(tmp_path):
    """--api-servers 2: the head and one more API process on its port, each pinned; every token arrives, and the CPU
    of both processes is counted."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "eep_hpc.cli", "bench-head", "--standin-ranks", "2", "--streams", "24",
           "--output-len", "12", "--rounds", "2", "--steps-per-s", "100", "--api-servers", "2", "--run-dir",
           str(tmp_path / "run"), "--result-file", str(out), "--head-cpu", "0", "--api-cpus", "0",
           "--client-cpu", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["failed"] == 0 and run["requests"] == 48
    assert run["tokens"] == sum(-(-(i + 1) * 12 // 24) + 12 for i in range(24))
    assert run["added_delay_ms"]["count"] == run["tokens"]
    assert run["head_added_delay_ms"]["count"] == run["tokens"]  # send times from both processes
    assert run["api_servers"] == 2 and run["api_cpus"] == [0, 0]
    assert len(run["api_cpu_s"]) == 2 and all(c > 0 for c in run["api_cpu_s"])
    # every stream's connection was seen on the process that took it, and both took some
    assert sum(run["api_tokens"]) == run["tokens"] and all(n > 0 for n in run["api_tokens"])


def test_bench_head_refuses_bad_options_in_one_line(tmp_path):
    for bad, message in ((["--streams", "0"], "--streams must be at least 1"),
                         (["--steps-per-s", "fast"], "--steps-per-s wants numbers"),
                         (["--head-cpu", "4096"], "--head-cpu 4096 is not one of this machine's CPUs"),
                         (["--api-servers", "2", "--api-cpus", "4096"], "--api-cpus: 4096 is not one of this"),
                         (["--api-servers", "0"], "--api-servers must be at least 1"),
                         (["--rank-cpu", "4096"], "--rank-cpu 4096 is not one of this machine's CPUs")):
        done = subprocess.run([sys.executable, "-m", "eep_hpc.cli", "bench-head", *bad, "--run-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2
        line, = done.stderr.strip().splitlines()
        assert line.startswith(f"eep-hpc bench-head: {message}")


def test_grow_and_kill9_under_standin_load_lose_no_request(tmp_path):
    """The coordinator keeps deciding while tokens stream: a grow, then a kill -9 of a member, under 48 streams of
    stand-in load, end with every request complete and exact (its prompt's tokens over again, finish "length")."""
    head = start_head(tmp_path, ranks=2, parallel={"rank_engine": "standin"}, standin={"steps_per_s": 100.0},
                      engine={"max_num_seqs": 32}, control={"rank_timeout_s": 10.0})
    host, port = head.url.split("//")[1].rsplit(":", 1)
    prompt = prompt_ids(512, 6)
    expected = head.tokenizer.decode([prompt[k % len(prompt)] for k in range(24)])
    try:
        async def scenario():
            stop = asyncio.Event()
            results = []

            async def stream_loop():
                conn = Connection(host, int(port))
                try:
                    while not stop.is_set():
                        body = {"model": head.model, "prompt": prompt, "max_tokens": 24, "stream": True,
                                "stream_options": {"include_usage": True}}
                        results.append(await conn.complete(body, keep_text=True))
                finally:
                    conn.close()

            load = [asyncio.create_task(stream_loop()) for _ in range(48)]
            await until(lambda: len(results) >= 48, 60, "requests to complete before the grow")
            async with httpx.AsyncClient(timeout=120) as admin:
                grown = (await admin.post(f"{head.url}/admin/scale/grow", json={"n": 1})).json()
            victim = head.state()["members"][0]
            before_kill = len(results)
            os.kill(pid_of(head.state(), victim), signal.SIGKILL)
            recovered = await wait_for_event(head, "recover", 1)
            await until(lambda: len(results) >= before_kill + 96, 60, "requests to complete after the recovery")
            stop.set()
            await asyncio.gather(*load)
            return results, grown, recovered, victim

        results, grown, recovered, victim = asyncio.run(scenario())
        assert grown["phase"] == "DONE", grown
        assert victim not in head.state()["members"] and len(head.state()["members"]) == 2
        failed = [(r.error, r.finish_reason, r.completion_tokens) for r in results
                  if r.error or r.finish_reason != "length" or r.completion_tokens != 24 or r.text != expected]
        assert failed == [] and len(results) > 96
    finally:
        head.stop()


def test_bench_head_scale_plan_grow_and_kill9_under_load(tmp_path):
    """`bench-head --scale-plan grow@2,kill@6`: one stand-in rank more through the admin API, then a kill -9 of a
    member rank's process, while 64 streams run; every request is complete and its text exact, the grow is DONE, and
    the head recovered from the kill (its recover event DONE, the rank no member), each with its gap measured."""
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "eep_hpc.cli", "bench-head", "--standin-ranks", "2", "--streams", "64",
           "--output-len", "16", "--rounds", "2", "--steps-per-s", "50", "--scale-plan", "grow@2,kill@6",
           "--scale-settle-s", "2", "--recover-timeout-s", "60", "--run-dir", str(tmp_path / "run"),
           "--result-file", str(out), "--head-cpu", "0", "--client-cpu", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = json.loads(out.read_text())["runs"]
    assert run["text_checked"] and run["failed"] == 0, run["failures"]
    assert run["streams_seen"] == 64 and run["requests"] > 2 * 64  # the streams went on past --rounds
    assert run["tokens"] == run["tokens_asked"]
    grow, kill = run["scale_plan"]
    assert grow["kind"] == "grow" and grow["phase"] == "DONE", grow
    assert grow["head_event"]["from_ranks"] == 2 and grow["head_event"]["to_ranks"] == 3, grow
    assert kill["kind"] == "kill" and kill["phase"] == "DONE", kill  # NOT_RECOVERED fails here
    assert kill["head_event"]["lost"] == [kill["rank_id"]] and not kill["victim_still_member"], kill
    assert len(kill["members_after"]) == 2 and kill["at_s"] >= grow["done_s"]
    for e in (grow, kill):
        assert e["took_s"] > 0 and e["longest_gap_ms"] > 0
        assert e["longest_gap_from_s"] <= e["done_s"] and e["longest_gap_to_s"] >= e["at_s"]  # it overlaps the event
    assert [e["kind"] for e in run["scale_events"]] == ["grow", "recover"]


def test_bench_head_refuses_a_bad_scale_plan(tmp_path):
    for bad in ("grow@", "jump@3", "kill@-1", ","):
        done = subprocess.run([sys.executable, "-m", "eep_hpc.cli", "bench-head", "--scale-plan", bad, "--run-dir",
                               str(tmp_path)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, bad
        line, = done.stderr.strip().splitlines()
        assert line.startswith("eep-hpc bench-head: --scale-plan"), line
