"""Abrupt loss of ranks (kill -9) while serving: survivors re-form, no request fails, text stays the reference's."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from conftest import start_head
from streaming_load import reference_texts, run_load
from test_elastic import alive, only_held_by

MAX_TOKENS = 32


def pid_of(state: dict, rank_id: int) -> int:
    return next(r["pid"] for r in state["ranks"] if r["rank_id"] == rank_id)


async def wait_for_event(head, kind: str, count: int, timeout_s: float = 120) -> dict:
    """The `count`-th scale event of `kind` that completed (phase DONE)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done = [e for e in head.state()["scale_events"] if e["kind"] == kind and e["phase"] == "DONE"]
        if len(done) >= count:
            return done[count - 1]
        await asyncio.sleep(0.1)
    raise AssertionError(f"no {kind} event within {timeout_s} s: {head.state()['scale_events']}")


def check_texts(result, reference) -> None:
    assert result.failures == [], result.failures[:5]
    assert result.completed > 0
    for k, texts in result.texts.items():
        assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"


def test_kill9_of_a_member_under_load_loses_no_request(tmp_path):
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
            await asyncio.sleep(0.8)
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
    finally:
        head.stop()


@pytest.mark.parametrize("who", ["departing", "sending"])
def test_kill9_during_a_scaling_event_rolls_back_then_recovers(tmp_path, who):
    """A departing rank dies while its shrink copies experts, or the peer a joiner reads weights from dies during
    the grow: the event rolls back, the survivors re-form, and no request fails."""
    head = start_head(tmp_path, ranks=3 if who == "departing" else 2)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        before = head.state()
        victim = before["members"][-1]
        pid = pid_of(before, victim)
        coordinator = head.head.coordinator

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=10))
            await asyncio.sleep(0.5)
            path, body = (("/admin/scale/shrink", {"rank_ids": [victim]}) if who == "departing"
                          else ("/admin/scale/grow", {"n": 1}))
            async with httpx.AsyncClient(timeout=300) as client:
                scaling = asyncio.create_task(client.post(f"{head.url}{path}", json=body))
                while coordinator.event is None:  # kill it once the event is under way
                    await asyncio.sleep(0.005)
                os.kill(pid, signal.SIGKILL)
                response = await scaling
            event = await wait_for_event(head, "recover", 1)
            await asyncio.sleep(1.0)
            stop.set()
            return await load, response, event

        result, response, event = asyncio.run(scenario())
        after = head.state()
        check_texts(result, reference)
        assert event["phase"] == "DONE" and event["lost"] == [victim], event
        assert victim not in after["members"]
        # the event rolled back with a clear error (or, had the loss come after its commit, completed)
        scaled = [e for e in after["scale_events"] if e["kind"] == ("shrink" if who == "departing" else "grow")][-1]
        if response.status_code == 200:
            assert scaled["phase"] == "DONE"
        else:
            assert response.status_code == 503 and "rolled back" in response.json()["error"]["message"], response.text
            assert scaled["phase"] == "ROLLED_BACK"
        assert asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS)) == reference
    finally:
        head.stop()
