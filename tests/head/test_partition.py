"""A member cut off while it serves (no messages either way, its job out of the scheduler's reach): the head
declares it lost within control.rank_timeout_s, the survivors re-form and finish every open request with the
reference text, and when the rank is heard from again it is fenced: its messages are refused and it is told to shut
down, and it exits 0.

Here the cut is a SIGSTOP of the rank process (it neither sends nor reads) and a job whose kill cannot reach it; the
Slurm test cluster cuts a real link between network namespaces (tests/cluster/test_partition_slurm.py).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx

from support import alive, pid_of, reference_texts, run_load, start_head, until, wait_for_event

MAX_TOKENS = 32
RANK_TIMEOUT_S = 3.0
HEARTBEAT_S = 0.5


def test_cut_off_member_is_replaced_then_fenced_when_heard_again(tmp_path):
    head = start_head(tmp_path, ranks=3, control={"rank_timeout_s": RANK_TIMEOUT_S, "heartbeat_s": HEARTBEAT_S,
                                                  "head_timeout_s": 120.0})
    coordinator = head.head.coordinator
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        before = head.state()
        victim = before["members"][1]
        pid = pid_of(before, victim)
        coordinator.ranks[victim].job.kill = lambda: None  # the scheduler cannot reach a node behind a cut link

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=12))
            await until(lambda: any(r["rank_id"] == victim and r["requests_in_flight"] > 0
                                    for r in head.state()["ranks"]), 60, f"rank {victim} serving")
            os.kill(pid, signal.SIGSTOP)
            event = await wait_for_event(head, "recover", 1)
            await asyncio.sleep(1.0)  # serving goes on on the survivors
            stop.set()
            return await load, event

        try:
            result, event = asyncio.run(scenario())
        finally:
            os.kill(pid, signal.SIGCONT)  # the link comes back
        assert result.failures == [], result.failures[:5]
        assert result.completed > 0
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
        assert event["phase"] == "DONE" and event["lost"] == [victim], event
        # noticed within the timeout, give or take a heartbeat (the rank's last message came before the cut)
        assert event["detect_s"] <= RANK_TIMEOUT_S + 2 * HEARTBEAT_S, event
        # fenced: what it sends now is refused, it is told to leave, and it ends as a rank ends, with exit code 0
        deadline = time.monotonic() + 60
        while alive(pid):
            assert time.monotonic() < deadline, "the fenced rank never exited"
            time.sleep(0.2)
        assert coordinator.health.fenced >= 1
        job = coordinator.ranks[victim].job.job
        assert job.result() == 0  # run_rank's return: it left on Shutdown (a head timeout would be 1)
        after = head.state()
        assert victim not in after["members"] and len(after["members"]) == 2
        assert asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS)) == reference
    finally:
        head.stop()


def test_rank_busy_longer_than_the_timeout_is_not_declared_lost(tmp_path):
    """A rank whose main loop is deaf for longer than rank_timeout_s (here a stand-in step of 2.5 s, as a long
    prefill or a weight load on a GPU) still beacons from its own thread: its request completes, nothing is
    recovered."""
    timeout_s, step_s = 1.5, 2.5
    head = start_head(tmp_path, ranks=1, parallel={"rank_engine": "standin"}, standin={"steps_per_s": 1 / step_s},
                      control={"rank_timeout_s": timeout_s, "heartbeat_s": 0.3})
    try:
        body = {"model": head.model, "prompt": "a b c d", "max_tokens": 3, "stream": True, "ignore_eos": True}
        arrivals = []
        with httpx.stream("POST", f"{head.url}/v1/completions", json=body, timeout=60) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    assert "error" not in json.loads(line[6:]), line
                    arrivals.append(time.monotonic())
                if line == "data: [DONE]":
                    break
        assert len(arrivals) == 3
        # the rank's main loop sent nothing between tokens for longer than the timeout
        assert max(b - a for a, b in zip(arrivals, arrivals[1:])) > timeout_s
        state = head.state()
        assert [e for e in state["scale_events"] if e["kind"] == "recover"] == []
        assert [r["state"] for r in state["ranks"]] == ["READY"]
    finally:
        head.stop()
