"""The `eep-hpc` command as a user meets it against a serving head: what status, grow, shrink and rebalance print,
a refusal in one line, logs. Mistakes in its arguments: test_input_checks.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

from support import ROOT, metric, pid_of, start_head, wait_for_event, wait_until


def eep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eep_hpc.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_observation(url: str, name: str, value: float, **labels: str) -> None:
    """The histogram `name` holds exactly one observation, `value` (to the rounding of the event summary), in the
    buckets a Prometheus histogram_quantile would read: every bound below it 0, every bound from it on 1."""
    assert metric(url, f"{name}_count", **labels) == 1
    assert abs(metric(url, f"{name}_sum", **labels) - value) < 1e-3
    buckets = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(f"{name}_bucket{{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            bound = line.split('le="')[1].split('"')[0]
            buckets[float(bound)] = float(line.rsplit(" ", 1)[1])
    assert max(buckets) == float("inf") and min(buckets) <= 0.001 and 10 <= sorted(buckets)[-2] <= 100, buckets
    assert all(n == (1 if bound >= value else 0) for bound, n in buckets.items()), (value, buckets)


def test_rebalance_that_moves_nothing_says_so(api):
    r = eep("rebalance", "--url", api.url)
    assert r.returncode == 0, r.stderr
    assert "placement unchanged, nothing moved" in r.stdout


def test_commands_do_not_print_http_request_logs(api):
    for args in (["status"], ["status", "--json"], ["rebalance"], ["adapt", "--min", "1", "--max", "1", "--off"]):
        r = eep(*args, "--url", api.url)
        assert r.returncode == 0, (args, r.stderr)
        assert "HTTP Request" not in r.stderr + r.stdout and "httpx" not in r.stderr, (args, r.stderr)


# ---- status: what a user reads -----------------------------------------------------------------------------------


def test_status_names_ranks_by_id_and_shows_recoveries_and_adapt(tmp_path, caplog):
    """After rank 0 dies, the survivor is rank 1 at position 0 of the epoch: placement lines say r1 (the id that
    shrink --rank takes), the recovery's line names the lost rank with its detect and recovery times (also in
    /metrics), and one line gives the adapt state."""
    caplog.set_level("INFO", logger="eep_hpc.coordinator")
    head = start_head(tmp_path / "run", ranks=2)
    try:
        os.kill(pid_of(head.state(), 0), signal.SIGKILL)
        event = asyncio.run(wait_for_event(head, "recover", 1))
        assert event["lost"] == [0] and event["left"] == [0] and event["joined"] == []
        assert eep("adapt", "--min", "1", "--max", "3", "--off", "--url", head.url).returncode == 0
        # the survivor's figures arrive with its next heartbeat after the recovery (until then its KV reads "-")
        wait_until(lambda: head.state()["ranks"][0]["kv_blocks_total"] > 0, 15, "the survivor's stats")
        r = eep("status", "--url", head.url)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        layers = [line for line in lines if line.startswith("layer ")]
        assert layers and all(" r1:" in line and " r0:" not in line for line in layers), r.stdout
        recover = [line for line in lines if line.startswith("recover 2 -> 1 ranks")]
        assert len(recover) == 1, r.stdout
        assert (f"rank(s) 0 lost, detected in {event['detect_s']:.3f} s, serving again in {event['recovery_s']:.3f} s"
                in recover[0]), recover[0]
        assert "adapt off: 1..3 ranks" in lines, r.stdout
        # the table lists live ranks only, like squeue: the dead rank 0 is gone from it (the recover line names it)
        state = head.state()
        assert [r["rank_id"] for r in state["ranks"]] == [1]
        rank1 = state["ranks"][0]
        table = lines[lines.index(next(line for line in lines if line.startswith("RANK"))):][:2]
        assert table[0].split() == ["RANK", "STATE", "NODE", "JOBID", "DEVICE", "RUNNING", "WAITING", "KV", "USE",
                                    "SLOTS", "STEPS", "GRAPHS"], r.stdout
        slots = len(state["placement"]["physical_to_logical"][0])  # the survivor holds every slot
        kv = f"{rank1['kv_blocks_used']}/{rank1['kv_blocks_total']}"
        row = table[1].split()
        assert row[:8] == ["1", "READY", rank1["host"], str(rank1["job_id"]), "cpu", "0", "0", kv], r.stdout
        assert row[9] == str(slots) == str(rank1["expert_slots"]), r.stdout
        assert not any(line.split()[:1] == ["0"] for line in lines), r.stdout
        as_json = json.loads(eep("status", "--json", "--url", head.url).stdout)
        assert [r["rank_id"] for r in as_json["ranks"]] == [1] and as_json["members"] == [1]
        assert metric(head.url, "eep_hpc:recover_ranks_lost") == 1
        assert metric(head.url, "eep_hpc:ranks_lost_total") == 1
        assert metric(head.url, "eep_hpc:recover_detect_seconds") == event["detect_s"]
        assert metric(head.url, "eep_hpc:recover_seconds") == event["recovery_s"] > 0
        # ... and as histograms over every recovery
        for name, value in (("recovery_detect_time", event["detect_s"]), ("recovery_time", event["recovery_s"])):
            assert_one_observation(head.url, f"eep_hpc:{name}_seconds", value)

        # a grow's line names the rank that joined
        r = eep("grow", "1", "--url", head.url, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "grow 1 -> 2 ranks" in r.stdout and "rank(s) 2 joined" in r.stdout, r.stdout
        # while it waited, a line each time the joining rank moved on (stderr is no terminal here: no bar)
        progress = r.stderr.splitlines()
        phase = r"grow: [01]/1 ready: (waiting for the head to submit the rank\(s\)|rank 2 (queued|submitted|" \
                r"connected|staging|committing|ready))"
        assert progress and all(re.fullmatch(phase, line) for line in progress), r.stderr
        assert any("rank 2 " in line for line in progress) and len(set(progress)) == len(progress), r.stderr
        # the head logged each event in one line, the line the CLI prints
        logged = [rec.getMessage() for rec in caplog.records if rec.name == "eep_hpc.coordinator"]
        assert r.stdout.strip() in logged and recover[0] in logged, logged
        grow = [e for e in head.state()["scale_events"] if e["kind"] == "grow"]
        assert_one_observation(head.url, "eep_hpc:scale_commit_pause_seconds", grow[0]["commit_pause_ms"] / 1000,
                               kind="grow")
        r = eep("shrink", "--rank", "1", "--url", head.url, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "shrink 2 -> 1 ranks" in r.stdout and "rank(s) 1 left" in r.stdout, r.stdout
        assert " r2:" in eep("status", "--url", head.url).stdout
    finally:
        head.stop()


def test_grow_no_wait_says_which_ranks_were_submitted_and_a_refusal_is_one_line(tmp_path):
    """A head with an API key guards /admin/* with a token of its own (RUN_DIR/admin-token): without it the CLI says
    so in one line and nothing changes; with --run-dir it finds the token."""
    run_dir = tmp_path / "run"
    head = start_head(run_dir, ranks=1, serve={"api_key": "sk-test"})
    token = {"Authorization": f"Bearer {(run_dir / 'admin-token').read_text().strip()}"}

    def events() -> list[dict]:
        return httpx.get(f"{head.url}/admin/state", headers=token, timeout=10).json()["scale_events"]

    try:
        for args in (["status"], ["grow", "1"], ["shrink", "--rank", "0"], ["rebalance"],
                     ["adapt", "--min", "1", "--max", "2"]):
            r = eep(*args, "--url", head.url)
            assert (r.returncode, r.stdout) == (1, ""), (args, r)
            assert r.stderr == ("eep-hpc: Missing admin token: send the header 'Authorization: Bearer <admin token>'. "
                                "(--admin-token TOKEN, or --run-dir of the head, which finds it)\n"), (args, r.stderr)
        r = eep("status", "--url", head.url, "--admin-token", "sk-test")  # the API key is not the admin token
        assert r.returncode == 1 and r.stderr.startswith("eep-hpc: Incorrect admin token provided. "), r.stderr
        assert events() == []

        r = eep("grow", "1", "--no-wait", "--run-dir", str(run_dir))
        assert r.returncode == 0, r.stderr
        assert r.stdout == "grow: rank(s) 1 submitted; they join when their jobs start (eep-hpc status shows them)\n"
        deadline = time.monotonic() + 120
        while not [e for e in events() if e["phase"] == "DONE"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [(e["kind"], e["phase"], e["joined"]) for e in events()] == [("grow", "DONE", [1])]
    finally:
        head.stop()


# ---- logs ----------------------------------------------------------------------------------------------------------


def test_log_level_debug_brings_back_the_http_lines(api):
    r = eep("status", "--url", api.url, "--log-level", "debug")
    assert r.returncode == 0, r.stderr
    assert "HTTP Request: GET" in r.stderr and "/admin/state" in r.stderr, r.stderr


@contextlib.contextmanager
def serve_process(run_dir: Path, *flags: str):
    """`eep-hpc serve` in a process of its own, yielded once it says it serves (.ready, .url; its stderr so far in
    the file .err_path); Ctrl-C on the way out, then its whole stderr and exit code are in .err and .returncode."""
    run_dir.mkdir(parents=True, exist_ok=True)
    err_path = run_dir / "serve.err"
    with err_path.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "eep_hpc.cli", "serve", "--port", "0", "--run-dir",
                                 str(run_dir), *flags], stdout=subprocess.PIPE, stderr=err, text=True)
    run = SimpleNamespace(ready="", url="", err_path=err_path, err="", returncode=None)
    try:
        run.ready = proc.stdout.readline()
        assert run.ready.startswith("eep-hpc serving"), (run.ready, err_path.read_text())
        run.url = run.ready.split(" at ")[1].split()[0]
        yield run
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=120)
        run.err, run.returncode = err_path.read_text(), proc.returncode


def test_serve_log_level_warning_quiets_the_head_and_its_ranks(tmp_path):
    run_dir = tmp_path / "run"
    with serve_process(run_dir, "--log-level", "warning") as run:
        assert run.ready.startswith("eep-hpc serving eep-tiny-moe on 1 rank(s) at http://"), run.ready
    assert run.returncode == 0, run.err
    assert " INFO " not in run.err, run.err
    rank_logs = list((run_dir / "jobs").glob("*_log.err"))
    assert rank_logs
    for log in rank_logs:  # the rank inherited the level: not even its exit is logged at INFO
        assert " INFO " not in log.read_text(), log.read_text()


def test_serve_access_log_is_off_by_default_and_on_when_asked(tmp_path):
    for flags in ([], ["--access-log"]):
        with serve_process(tmp_path / f"run{len(flags)}", *flags) as run:
            assert httpx.get(f"{run.url}/v1/models", timeout=30).status_code == 200
        access = [line for line in run.err.splitlines() if '"GET /v1/models HTTP/1.1" 200' in line]
        assert len(access) == (1 if flags else 0), run.err


def test_serve_freezes_the_start_up_heap_of_the_head_and_its_api_processes(tmp_path):
    """Once up, the head and its other API processes move their start-up objects out of the garbage collector's
    walks (eep_hpc/gc_heap.py) and say how many; a rank does not (its first epoch's objects must stay collectable)."""
    run_dir = tmp_path / "run"
    with serve_process(run_dir, "--set", "serve.api_servers=2", "--log-level", "info") as run:
        # the second API process freezes once the head says the service is ready, which may be after the head's line
        wait_until(lambda: "API process 1: " in run.err_path.read_text(), 60, "the API process froze its heap")
    for who in ("head", "API process 1"):
        frozen = re.search(rf"{who}: (\d+) start-up objects frozen", run.err)
        assert frozen and int(frozen.group(1)) > 10_000, f"{who}:\n{run.err[-3000:]}"
    rank_log = "".join(p.read_text() for p in (run_dir / "jobs").glob("*_log.err"))
    assert rank_log and "frozen" not in rank_log, rank_log


def test_a_long_garbage_collection_is_logged_with_its_pause():
    code = ("import gc, logging; logging.basicConfig(level='INFO')\n"
            "from eep_hpc.gc_heap import freeze_startup_heap, warn_on_long_pauses\n"
            "kept = [[] for _ in range(1000)]\n"
            "freeze_startup_heap('probe'); assert not any(o is kept for o in gc.get_objects())\n"
            "warn_on_long_pauses('probe', threshold_s=0.0); warn_on_long_pauses('probe', threshold_s=0.0)\n"
            "assert len(gc.callbacks) == 1, gc.callbacks  # one watch however often it is asked for\n"
            "gc.collect()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert re.search(r"probe: \d+ start-up objects frozen", r.stderr), r.stderr
    assert re.search(r"probe: a garbage collection of generation 2 stopped this process for \d+ ms", r.stderr), r.stderr
