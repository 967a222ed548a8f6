"""Soak: streaming load through many grow/shrink events and several kill -9s, then check nothing failed or leaked.

Bounded for CI (about a minute on 2 cores); SOAK_ROUNDS=N runs N rounds of the plan for a longer soak.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from conftest import start_head
from streaming_load import reference_texts, run_load
from test_elastic import alive, rss_kib
from test_faults import wait_for_event

MAX_TOKENS = 24
# one round from 2 members back to 2: grow, grow, kill -9 one (recovery), shrink, grow, kill -9 another
ROUND = ["grow", "grow", "kill", "shrink", "grow", "kill"]


def usage(head) -> dict:
    """What must not grow: the head's fds and threads, live rank processes, the oldest rank's memory."""
    state = head.state()
    pids = [r["pid"] for r in state["ranks"] if r["pid"]]
    return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task")),
            "rank_processes": sum(alive(p) for p in pids), "members": len(state["members"]),
            "rss_kib": rss_kib(next(r["pid"] for r in state["ranks"] if r["rank_id"] == state["members"][0]))}


def test_soak_grow_shrink_and_kills_under_load(tmp_path):
    rounds = int(os.environ.get("SOAK_ROUNDS", "2"))
    head = start_head(tmp_path, ranks=2)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        samples = []
        kills = 0

        async def act(client, action: str) -> None:
            nonlocal kills
            state = head.state()
            if action == "grow":
                r = await client.post(f"{head.url}/admin/scale/grow", json={"n": 1})
                assert r.status_code == 200 and r.json()["phase"] == "DONE", r.text
            elif action == "shrink":
                r = await client.post(f"{head.url}/admin/scale/shrink", json={"rank_ids": [state["members"][-1]]})
                assert r.status_code == 200 and r.json()["phase"] == "DONE", r.text
            else:  # kill -9 a member other than the oldest (whose memory is sampled)
                victim = state["members"][-1]
                os.kill(next(x["pid"] for x in state["ranks"] if x["rank_id"] == victim), signal.SIGKILL)
                kills += 1
                await wait_for_event(head, "recover", kills)

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=12))
            async with httpx.AsyncClient(timeout=300) as client:
                for _ in range(rounds):
                    for action in ROUND:
                        await asyncio.sleep(0.3)
                        await act(client, action)
                    await asyncio.sleep(1.0)  # let exits finish before sampling
                    samples.append(usage(head))
            stop.set()
            return await load

        t0 = time.monotonic()
        result = asyncio.run(scenario())
        print(f"soak: {rounds} round(s) of {ROUND} in {time.monotonic() - t0:.0f} s, {result.completed} requests; "
              f"usage per round {samples}")
        assert result.failures == [], result.failures[:5]
        assert result.completed >= 12
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
        events = head.state()["scale_events"]
        assert sum(e["kind"] == "recover" and e["phase"] == "DONE" for e in events) == 2 * rounds
        first, last = samples[0], samples[-1]
        assert last["members"] == first["members"] == 2
        assert last["rank_processes"] == last["members"], "a removed or killed rank's process lives on"
        if rounds > 1:  # the first round sets up what later rounds reuse; after it, nothing may grow
            assert last["fds"] <= first["fds"] + 4, samples
            assert last["threads"] <= first["threads"] + 2, samples
            assert last["rss_kib"] - first["rss_kib"] < 64 * 1024, samples
    finally:
        head.stop()
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank_of(p, tmp_path)]
    assert not leftovers, f"rank processes outlived the head: {leftovers}"


def _is_rank_of(proc: Path, run_dir: Path) -> bool:
    try:
        return str(run_dir) in (proc / "cmdline").read_text() and alive(int(proc.name))
    except OSError:
        return False
