"""Abrupt loss of ranks (kill -9) while serving: survivors re-form, no request fails, text stays the reference's."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

import httpx
import pytest

from support import reference_texts, run_load
from support import alive, only_held_by, pid_of, start_head, until, wait_for_event

MAX_TOKENS = 32


def serving_on(head, rank_id: int):
    """A fact to wait for: the rank holds requests of the load (so that losing it moves requests)."""
    return lambda: any(r["rank_id"] == rank_id and r["requests_in_flight"] > 0 for r in head.state()["ranks"])


def check_texts(result, reference) -> None:
    assert result.failures == [], result.failures[:5]
    assert result.completed > 0
    for k, texts in result.texts.items():
        assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-standin"])
def test_kill9_of_a_member_under_load_loses_no_request(tmp_path, monkeypatch, graphs):
    """graph-standin: the steps go through the CUDA-graph path's CPU stand-in (EEP_HPC_GRAPH_STANDIN=1), so the
    victim dies in a replay or a capture round, and the survivors re-form and capture again in step."""
    if graphs:
        monkeypatch.setenv("EEP_HPC_GRAPH_STANDIN", "1")
    head = start_head(tmp_path, ranks=3)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        before = head.state()
        victim = before["members"][1]
        pid = pid_of(before, victim)
        sole = only_held_by(before["placement"], before["members"], [victim])
        assert sole, "the victim should hold experts no one else has (restored from the checkpoint)"

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=12))
            await until(serving_on(head, victim), 60, f"rank {victim} serving requests of the load")
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            event = await wait_for_event(head, "recover", 1)
            recovered_s = time.monotonic() - killed_at
            await asyncio.sleep(1.0)  # serving goes on on the survivors
            stop.set()
            return await load, event, recovered_s

        result, event, recovered_s = asyncio.run(scenario())
        print(f"kill -9 -> serving again in {recovered_s:.2f} s; event {event}")
        after = head.state()
        check_texts(result, reference)
        assert event["phase"] == "DONE" and event["lost"] == [victim], event
        assert event["from_ranks"] == 3 and event["to_ranks"] == 2
        assert event["requests_migrated"] > 0, "requests in flight should have started again on the survivors"
        assert after["members"] == [m for m in before["members"] if m != victim]
        for layer, e in sole:  # experts only the victim held are served again
            assert e in after["placement"]["physical_to_logical"][layer]
        assert not alive(pid)
        # the recovered group scales like any other
        grown = httpx.post(f"{head.url}/admin/scale/grow", json={"n": 1}, timeout=300).json()
        assert grown["phase"] == "DONE", grown
        assert asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS)) == reference
        if graphs:  # the steps did go through the stand-in: every rank captured, the survivors again after the loss
            logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("*.err"))
            assert "captured the decode graph" in logs and "graphs dropped (re-captured on use)" in logs, logs[-3000:]
    finally:
        head.stop()


@pytest.mark.parametrize("who", ["departing", "sending"])
def test_kill9_during_a_scaling_event_rolls_back_then_recovers(tmp_path, who):
    """A departing rank dies while its shrink prepares, or a serving peer (which a joiner may read weights from)
    dies during the grow: the event rolls back (503, the event ROLLED_BACK naming the dead rank), the survivors
    re-form without it, and no request fails."""
    head = start_head(tmp_path, ranks=3 if who == "departing" else 2)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        before = head.state()
        victim = before["members"][-1]
        pid = pid_of(before, victim)
        coordinator = head.head.coordinator
        kind = "shrink" if who == "departing" else "grow"

        async def kill_once_the_event_opens() -> str:
            """On the head's event loop, so the kill lands before the coordinator handles any reply to the event's
            first messages: well before every participant could have prepared, let alone committed."""
            while coordinator.event is None or coordinator.event.kind != kind:
                await asyncio.sleep(0.001)
            os.kill(pid, signal.SIGKILL)
            return coordinator.event.phase.name

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=10))
            await until(serving_on(head, victim), 60, f"rank {victim} serving requests of the load")
            killer = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(kill_once_the_event_opens(), head.loop))
            path, body = (("/admin/scale/shrink", {"rank_ids": [victim]}) if who == "departing"
                          else ("/admin/scale/grow", {"n": 1}))
            async with httpx.AsyncClient(timeout=300) as client:
                response = await client.post(f"{head.url}{path}", json=body)
            phase_at_kill = await killer
            event = await wait_for_event(head, "recover", 1)
            await asyncio.sleep(1.0)  # serving goes on on the survivors
            stop.set()
            return await load, response, event, phase_at_kill

        result, response, event, phase_at_kill = asyncio.run(scenario())
        after = head.state()
        check_texts(result, reference)
        assert phase_at_kill == "PREPARING"
        # the event rolled back, and said why: the API's 503 and the event in /admin/state give the same reason,
        # the ranks that failed the event's step (the dead one, or a survivor that could not copy from it)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "scale_rolled_back", error
        why = re.fullmatch(r"scaling failed and was rolled back; still serving: "
                           r"(rank\(s\) \[[\d, ]+\] failed during \w+ of epoch (\d+))", error["message"])
        assert why, error
        scaled = [e for e in after["scale_events"] if e["kind"] == kind]
        assert [e["phase"] for e in scaled] == ["ROLLED_BACK"], scaled
        assert scaled[0]["error"] == f"ScaleFailed: {why.group(1)}" and scaled[0]["epoch"] == int(why.group(2)), scaled
        assert scaled[0]["to_ranks"] == (2 if who == "departing" else 3)
        # then the recovery: the survivors serve in a new epoch without the dead rank, with the same text
        assert event["phase"] == "DONE" and event["lost"] == [victim], event
        kinds = [e["kind"] for e in after["scale_events"]]
        assert kinds[0] == kind and set(kinds[1:]) == {"recover"}, after["scale_events"]
        assert after["members"] == [m for m in before["members"] if m != victim]
        assert not alive(pid)
        assert asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS)) == reference
    finally:
        head.stop()
