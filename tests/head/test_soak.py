"""Soak: streaming load through many grow/shrink events and several kill -9s, then check nothing failed or leaked.

Every rank process the test ever saw (the rank and its job's process, polled from /admin/state through the run)
must be gone shortly after the event that removed its rank, while the head still runs: a departed rank that never
exits fails the test at its shrink, not only when the head kills everything at the end.

Bounded for CI (about a minute on 2 cores); SOAK_ROUNDS=N runs N rounds of the plan for a longer soak.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import httpx

from support import reference_texts, run_load
from support import alive, job_pid, rss_kib, start_head, wait_for_event, wait_gone

MAX_TOKENS = 24
# one round from 2 members back to 2: grow, grow, kill -9 one (recovery), shrink, grow, kill -9 another
ROUND = ["grow", "grow", "kill", "shrink", "grow", "kill"]
# a shrunk rank exits on the head's Shutdown at once; this is well under the 10 s a later grow would wait before
# killing it, and under the 15 s (control.head_timeout_s) after which an orphaned rank exits on its own
EXIT_WITHIN_S = 8.0


class RankProcesses:
    """Every rank process seen in /admin/state: rank id -> {rank pid, its job's pid}."""

    def __init__(self) -> None:
        self.pids: dict[int, set[int]] = {}

    def see(self, state: dict) -> dict:
        for r in state["ranks"]:
            pids = self.pids.setdefault(r["rank_id"], set())
            pids.update(p for p in (r["pid"], job_pid(r)) if p)
        return state

    def of(self, rank_ids) -> set[int]:
        return {p for rid in rank_ids for p in self.pids.get(rid, ())}

    def all(self) -> set[int]:
        return {p for pids in self.pids.values() for p in pids}

    async def watch(self, url: str, stop: asyncio.Event) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            while not stop.is_set():
                self.see((await client.get(f"{url}/admin/state")).json())
                await asyncio.sleep(0.1)


def test_soak_grow_shrink_and_kills_under_load(tmp_path):
    rounds = int(os.environ.get("SOAK_ROUNDS", "2"))
    head = start_head(tmp_path, ranks=2)
    procs = RankProcesses()
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        samples = []
        kills = 0
        removals = []  # (action, rank id, seconds until its processes were gone)

        def usage() -> dict:
            """What must not grow: the head's fds and threads, live rank processes, the oldest rank's memory."""
            state = procs.see(head.state())
            rank_pids = {r["rank_id"]: r["pid"] for r in state["ranks"]}
            return {"fds": len(os.listdir("/proc/self/fd")), "threads": len(os.listdir("/proc/self/task")),
                    "processes": sum(alive(p) for p in procs.all()), "members": len(state["members"]),
                    "member_processes": sum(alive(p) for p in procs.of(state["members"])),
                    "rss_kib": rss_kib(rank_pids[state["members"][0]])}

        async def removed(action: str, rank_ids: list[int]) -> None:
            """The removed ranks' processes exit within EXIT_WITHIN_S of the event that removed them."""
            t0 = time.monotonic()
            for rid in rank_ids:
                assert procs.of([rid]), f"rank {rid} was removed before the test saw its process"
                await wait_gone(procs.of([rid]), EXIT_WITHIN_S,
                                f"rank {rid} removed by {action}: its processes outlived the event")
                removals.append((action, rid, round(time.monotonic() - t0, 2)))

        async def act(client, action: str) -> None:
            nonlocal kills
            before = procs.see(head.state())
            if action == "grow":
                r = await client.post(f"{head.url}/admin/scale/grow", json={"n": 1})
                assert r.status_code == 200 and r.json()["phase"] == "DONE", r.text
                procs.see(head.state())
            elif action == "shrink":
                leaving = before["members"][-1]
                r = await client.post(f"{head.url}/admin/scale/shrink", json={"rank_ids": [leaving]})
                assert r.status_code == 200 and r.json()["phase"] == "DONE", r.text
                assert leaving not in procs.see(head.state())["members"]
                await removed("shrink", [leaving])
            else:  # kill -9 a member other than the oldest (whose memory is sampled)
                victim = before["members"][-1]
                os.kill(next(x["pid"] for x in before["ranks"] if x["rank_id"] == victim), signal.SIGKILL)
                kills += 1
                event = await wait_for_event(head, "recover", kills)
                assert event["lost"] == [victim], event
                await removed("kill -9 and recovery", [victim])

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=12))
            watcher = asyncio.create_task(procs.watch(head.url, stop))
            async with httpx.AsyncClient(timeout=300) as client:
                for _ in range(rounds):
                    for action in ROUND:
                        await asyncio.sleep(0.3)  # the load runs on between events
                        await act(client, action)
                    samples.append(usage())
            stop.set()
            await watcher
            return await load

        t0 = time.monotonic()
        result = asyncio.run(scenario())
        print(f"soak: {rounds} round(s) of {ROUND} in {time.monotonic() - t0:.0f} s, {result.completed} requests; "
              f"usage per round {samples}; removed ranks gone after (action, rank, s) {removals}")
        assert result.failures == [], result.failures[:5]
        assert result.completed >= 12
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
        state = procs.see(head.state())
        events = state["scale_events"]
        assert sum(e["kind"] == "recover" and e["phase"] == "DONE" for e in events) == 2 * rounds
        # the test saw every rank the head ever started (2, then one per grow), each with its processes
        grown = sum(e["to_ranks"] - e["from_ranks"] for e in events if e["kind"] == "grow" and e["phase"] == "DONE")
        assert sorted(procs.pids) == list(range(2 + grown)), procs.pids
        assert all(len(pids) == 2 for pids in procs.pids.values()), procs.pids  # a rank and its job each
        assert len(removals) == 3 * rounds
        # with the head still up: the members' processes live, every other one it ever started is gone
        members = set(state["members"])
        assert all(alive(p) for p in procs.of(members))
        assert not [p for p in procs.of(set(procs.pids) - members) if alive(p)], "a removed rank's process lives on"
        first, last = samples[0], samples[-1]
        assert last["members"] == first["members"] == 2
        assert last["processes"] == last["member_processes"] == 2 * last["members"], samples
        if rounds > 1:  # the first round sets up what later rounds reuse; after it, nothing may grow
            assert last["fds"] <= first["fds"] + 4, samples
            assert last["threads"] <= first["threads"] + 2, samples
            assert last["rss_kib"] - first["rss_kib"] < 64 * 1024, samples
    finally:
        head.stop()
    assert not [p for p in procs.all() if alive(p)], "rank processes outlived the head"
    leftovers = [p for p in Path("/proc").iterdir() if p.name.isdigit() and _is_rank_of(p, tmp_path)]
    assert not leftovers, f"rank processes outlived the head: {leftovers}"


def _is_rank_of(proc: Path, run_dir: Path) -> bool:
    try:
        return str(run_dir) in (proc / "cmdline").read_text() and alive(int(proc.name))
    except OSError:
        return False
