"""Adaptive scaling: the pure policy, and the real head growing under load and shrinking when idle."""

from __future__ import annotations

import asyncio
import time

import httpx

from eep_hpc.config import AdaptConfig
from eep_hpc.head.autoscaler import RankLoad, decide
from support import run_load
from support import start_head

CFG = AdaptConfig(enabled=True, min_ranks=1, max_ranks=3, sustain_s=5, idle_s=30, lifetime_s=3600, replace_before_s=300)


def ranks(*waiting, age=10.0):
    return [RankLoad(i, age, 1, w, 0.1) for i, w in enumerate(waiting)]


def test_policy_grows_on_sustained_pressure_within_max():
    assert decide(CFG, ranks(5), pressure_for_s=6, idle_for_s=0).grow == 1
    assert decide(CFG, ranks(5), pressure_for_s=2, idle_for_s=0).grow == 0  # not sustained yet
    assert decide(CFG, ranks(5, 5, 5), pressure_for_s=60, idle_for_s=0).grow == 0  # at max


def test_policy_shrinks_idle_newest_rank_never_below_min():
    assert decide(CFG, ranks(0, 0), pressure_for_s=0, idle_for_s=31).shrink == [1]
    assert not decide(CFG, ranks(0), pressure_for_s=0, idle_for_s=3600).shrink
    assert decide(CFG, [], pressure_for_s=0, idle_for_s=0).grow == 1  # below min: back up


def test_policy_replaces_ranks_before_their_lifetime_ends():
    old = [RankLoad(0, 3400.0, 0, 0, 0.0)]
    assert decide(CFG, old, 0, 0).grow == 1  # the only rank: its replacement first
    both = old + [RankLoad(1, 5.0, 0, 0, 0.0)]
    assert decide(CFG, both, 0, 0).shrink == [0]  # then the old one goes


def test_head_adapts_to_load_and_back(tmp_path):
    # four sequences per rank at a time: 24 streams keep requests waiting, which is what reads as load
    head = start_head(tmp_path, ranks=1, adapt={"interval_s": 0.5}, engine={"max_num_seqs": 4})
    try:
        r = httpx.post(f"{head.url}/admin/adapt", json={"min": 3, "max": 1})
        assert r.status_code == 400 and "must not exceed" in r.json()["error"]["message"]
        r = httpx.post(f"{head.url}/admin/adapt", json={"min": 1, "max": 2, "sustain_s": 1, "idle_s": 2,
                                                        "queue_high": 0.5})
        assert r.status_code == 200 and r.json()["enabled"]

        async def load_until_grown():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, 48, stop, streams=24))
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and len(head.state()["members"]) < 2:
                await asyncio.sleep(0.5)
            stop.set()
            return await load

        result = asyncio.run(load_until_grown())
        assert result.failures == []
        assert len(head.state()["members"]) == 2
        deadline = time.monotonic() + 120  # idle now: back to min
        while time.monotonic() < deadline and len(head.state()["members"]) > 1:
            time.sleep(0.5)
        events = [(e["kind"], e["phase"]) for e in head.state()["scale_events"]]
        assert len(head.state()["members"]) == 1
        assert events == [("grow", "DONE"), ("shrink", "DONE")]
    finally:
        head.stop()
