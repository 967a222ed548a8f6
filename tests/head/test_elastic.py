"""Elastic scaling while serving, with real rank processes and real HTTP streams: zero failed requests."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time

import httpx

from support import admin_steps_under_load, reference_texts, run_load
from support import alive, only_held_by, open_fds_besides_clients_of, rank_pids, rss_kib, start_head, until, wait_gone

MAX_TOKENS = 32
EXIT_WITHIN_S = 8.0  # a rank that left exits on the head's Shutdown at once


async def post(url: str, path: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(timeout=300) as client:
        return await client.post(f"{url}{path}", json=body)


def grow_while(head, killer, then_grow: bool = False):
    """Under 8 streams, grow by one while `killer` (run in a thread) sabotages the join; optionally grow again.
    Returns (load result, the first grow's response, the second's or None)."""
    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=8))
        await asyncio.sleep(0.3)
        thread = threading.Thread(target=killer)
        thread.start()
        failed = await post(head.url, "/admin/scale/grow", {"n": 1})
        thread.join()
        await asyncio.sleep(0.5)
        again = await post(head.url, "/admin/scale/grow", {"n": 1}) if then_grow else None
        await asyncio.sleep(0.3)
        stop.set()
        return await load, failed, again

    return asyncio.run(scenario())


def test_grow_and_shrink_cycles_under_streaming_load(tmp_path):
    head = start_head(tmp_path, ranks=1)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        plan = [("grow", {"n": 1}), ("grow", {"n": 2}), ("shrink", {"n": 1}), ("shrink", {"n": 2})] * 2
        seen_pids: set[int] = set(rank_pids(head).values())
        survivor = rank_pids(head)[head.state()["members"][0]]
        sole_experts_moved = 0
        usage = []  # (head's open fds, survivor rank's resident KiB) after each cycle
        slot_totals = {head.state()["placement"]["slot_offsets"][-1]}  # physical slots of every epoch
        http_port = int(head.url.rsplit(":", 1)[1].split("/")[0])

        async def scenario():
            nonlocal sole_experts_moved
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=16))
            events = []
            for action, body in plan:
                await asyncio.sleep(0.4)
                before = head.state()
                pid_of = {r["rank_id"]: r["pid"] for r in before["ranks"]}
                r = await post(head.url, f"/admin/scale/{action}", body)
                assert r.status_code == 200, r.text
                events.append(r.json())
                after = head.state()
                slot_totals.add(after["placement"]["slot_offsets"][-1])
                seen_pids.update(rank_pids(head).values())
                if action == "shrink":
                    leaving = [m for m in before["members"] if m not in after["members"]]
                    # gone before the next grow (which would kill a rank that lingers): a rank that left exits
                    await wait_gone([pid_of[m] for m in leaving], EXIT_WITHIN_S, f"ranks {leaving} after their shrink")
                    sole = only_held_by(before["placement"], before["members"], leaving)
                    sole_experts_moved += len(sole)
                    for layer, e in sole:  # the expert now lives on a survivor
                        assert e in after["placement"]["physical_to_logical"][layer]
                if len(events) % 4 == 0:
                    usage.append((open_fds_besides_clients_of(http_port), rss_kib(survivor)))
            await asyncio.sleep(0.4)
            stop.set()
            return await load, events

        result, events = asyncio.run(scenario())
        assert result.failures == [], result.failures[:5]
        assert result.completed >= 16
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the single-rank reference"
        assert [len(head.state()["members"])] == [1]
        assert [(e["kind"], e["from_ranks"], e["to_ranks"], e["phase"]) for e in events] == [
            ("grow", 1, 2, "DONE"), ("grow", 2, 4, "DONE"), ("shrink", 4, 3, "DONE"), ("shrink", 3, 1, "DONE")] * 2
        assert sum(e["requests_migrated"] for e in events if e["kind"] == "shrink") > 0
        # members of a grow keep their slot tensors (fewer of their rows in use), as CUDA graphs need: the expert
        # tables keep their shapes at every size (the same number of slots in all), so only moved slots are staged
        logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("*") if p.is_file())
        assert logs.count("updated in place") >= 2 * (1 + 2), logs[-3000:]
        assert len(slot_totals) == 1, slot_totals
        # every rank (the joiners too) compiles into the run's one Triton cache: joiners find the first ranks' kernels
        cache = f"Triton's kernel cache: {tmp_path.resolve() / 'triton-cache'}"
        assert logs.count(cache) == len(seen_pids), (logs.count(cache), len(seen_pids))
        # the second cycle leaks nothing the first did not already set up: sockets, ports (fds), memory
        (fds1, rss1), (fds2, rss2) = usage
        assert fds2 <= fds1 + 4, f"the head's open files grew over a cycle: {fds1} -> {fds2}"
        assert rss2 - rss1 < 64 * 1024, f"the surviving rank grew by {(rss2 - rss1) // 1024} MiB over a cycle"
        assert sole_experts_moved > 0, "no shrink removed the only replica of an expert"
        assert all(e["bytes_moved"] > 0 for e in events)
        # joiners read the dense weights from a serving peer over NIXL, not from the checkpoint
        grows = [e for e in events if e["kind"] == "grow"]
        assert all(src.startswith("nixl:") for e in grows for src in e["dense_source"].split(",")), grows
        metrics = httpx.get(f"{head.url}/metrics").text
        assert 'eep_hpc:scale_events_total{kind="grow",result="done"} 4.0' in metrics
        # ranks that left exited; only the survivor's process remains
        survivors = set(rank_pids(head).values())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(alive(p) for p in seen_pids - survivors):
            time.sleep(0.2)
        assert not [p for p in seen_pids - survivors if alive(p)]
    finally:
        head.stop()
    assert not [p for p in seen_pids if alive(p)], "rank processes outlived the head"


def test_kill_joining_rank_rolls_back_and_keeps_serving(tmp_path):
    head = start_head(tmp_path, ranks=1)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        coordinator = head.head.coordinator

        def kill_newcomer():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                newcomers = [r for r in list(coordinator.ranks.values()) if r.rank_id not in coordinator.members]
                if newcomers:
                    time.sleep(0.3)  # mid-join: its process is starting or loading
                    newcomers[0].job.kill()
                    return
                time.sleep(0.05)

        result, failed, grown = grow_while(head, kill_newcomer, then_grow=True)  # scaling again works
        assert failed.status_code == 503
        assert failed.json()["error"]["code"] == "scale_rolled_back"
        assert grown.status_code == 200, grown.text
        assert grown.json()["to_ranks"] == 2
        assert result.failures == []
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts)
        state = head.state()
        assert len(state["members"]) == 2
        assert [e["phase"] for e in state["scale_events"]] == ["ROLLED_BACK", "DONE"]
    finally:
        head.stop()


def test_second_scale_request_is_refused_while_one_runs(tmp_path):
    head = start_head(tmp_path, ranks=1)
    try:
        async def scenario():
            first = asyncio.create_task(post(head.url, "/admin/scale/grow", {"n": 1}))
            # the grow's event opens once its rank has started; a second event meanwhile is refused
            while not head.state().get("scaling"):
                await asyncio.sleep(0.01)
            second = await post(head.url, "/admin/scale/shrink", {"n": 1})
            return await first, second

        first, second = asyncio.run(scenario())
        assert first.status_code == 200
        assert second.status_code == 409
        assert "in progress" in second.json()["error"]["message"]
        bad = httpx.post(f"{head.url}/admin/scale/shrink", json={"n": 2})
        assert bad.status_code == 400 and "at least one must stay" in bad.json()["error"]["message"]
    finally:
        head.stop()


def test_joiner_dying_during_expert_transfer_rolls_back(tmp_path):
    head = start_head(tmp_path, ranks=2, control={"transfer_timeout_s": 3.0})
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        coordinator = head.head.coordinator

        def kill_when_staged():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                staged = [k for k in list(coordinator.exchange.acks) if k[0] == "RankStaged"]
                if staged:
                    for rid in coordinator.exchange.acks[staged[0]]:
                        coordinator.ranks[rid].job.kill()  # it has its weights and waits for the experts
                    return
                time.sleep(0.01)

        result, failed, _ = grow_while(head, kill_when_staged)
        assert failed.status_code == 503, failed.text
        assert result.failures == []
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts)
        state = head.state()
        assert len(state["members"]) == 2 and state["epoch"] == 0
        assert state["scale_events"][-1]["phase"] == "ROLLED_BACK"
        shrunk = httpx.post(f"{head.url}/admin/scale/shrink", json={"n": 1}, timeout=120)
        assert shrunk.status_code == 200, shrunk.text  # and it can scale again
    finally:
        head.stop()


def test_sigterm_to_a_rank_drains_it_with_zero_failed_requests(tmp_path):
    head = start_head(tmp_path, ranks=3)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        before = head.state()
        victim = before["members"][1]
        pid = next(r["pid"] for r in before["ranks"] if r["rank_id"] == victim)

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=12))
            await until(lambda: any(r["rank_id"] == victim and r["requests_in_flight"] for r in head.state()["ranks"]),
                        60, f"rank {victim} serving requests of the load")  # so that its drain moves requests
            os.kill(pid, 15)  # what scancel or a preemption delivers
            await until(lambda: victim not in head.state()["members"], 120, f"rank {victim} drained after SIGTERM",
                        interval_s=0.2)
            await asyncio.sleep(0.5)  # the load goes on on the survivors
            stop.set()
            return await load

        result = asyncio.run(scenario())
        after = head.state()
        assert victim not in after["members"] and len(after["members"]) == 2
        assert after["scale_events"][-1]["kind"] == "shrink" and after["scale_events"][-1]["phase"] == "DONE"
        assert result.failures == []
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts)
        assert after["scale_events"][-1]["requests_migrated"] > 0
        asyncio.run(wait_gone([pid], EXIT_WITHIN_S, f"rank {victim} after its drain"))
    finally:
        head.stop()


def test_without_nixl_joiners_get_weights_by_broadcast_and_experts_by_all_to_all(tmp_path):
    head = start_head(tmp_path, ranks=1, parallel={"weight_transfer": "collective"})
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        grown = httpx.post(f"{head.url}/admin/scale/grow", json={"n": 2}, timeout=300)
        assert grown.status_code == 200, grown.text
        assert grown.json()["dense_source"] == "broadcast,broadcast"
        assert asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS)) == reference
    finally:
        head.stop()


def test_capture_rounds_through_grows_and_a_shrink_on_the_graph_standin(tmp_path, monkeypatch):
    """The step path of CUDA graphs on the CPU (EEP_HPC_GRAPH_STANDIN=1: each replay, and each capture's warm-up,
    an eager forward of the padded batch with its exchanges). Members of a grow keep their graphs; the joiner has
    none, so each size is first a capture round: it captures while the members replay with no rows. The shrink
    removes a first member: the former joiner's share outgrows its slot tensors, so it drops its graphs while the
    other survivor keeps them. If any rank ran a different number of exchanges in a step, the group would hang and
    break. Under 12 streams: 2 -> 3 -> 2 -> 3 ranks, zero failed requests, every text the 2-rank reference's."""
    monkeypatch.setenv("EEP_HPC_GRAPH_STANDIN", "1")
    head = start_head(tmp_path, ranks=2, engine={"cuda_graph_max_batch": 8, "cuda_graph_max_tokens": 64})
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))

        first = head.state()["members"][0]
        steps = [("scale/grow", {"n": 1}), ("scale/shrink", {"rank_ids": [first]}), ("scale/grow", {"n": 1})]
        result, events = admin_steps_under_load(head, steps, MAX_TOKENS, streams=12, pause_s=1.0)
        assert [(e["kind"], e["from_ranks"], e["to_ranks"], e["phase"]) for e in events] == [
            ("grow", 2, 3, "DONE"), ("shrink", 3, 2, "DONE"), ("grow", 2, 3, "DONE")]
        assert result.failures == [], result.failures[:5]
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the 2-rank reference"
        logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("*.err"))
        assert "lost the group" not in logs
        assert logs.count("step path kept (tables and CUDA graphs)") >= 2 + 1 + 2, logs[-3000:]
        shrink = events[1]["epoch"]  # the former joiner outgrew its slot tensors there; the other survivor kept
        assert f"epoch {shrink}: expert slots replaced, graphs dropped (re-captured on use)" in logs, logs[-3000:]
        assert re.search(rf"epoch {shrink}: \d+ expert slot\(s\) updated in place, step path kept", logs), logs[-3000:]
        assert "while a peer captured it" in logs  # members partnered a joiner's captures
        assert "on first use" in logs
    finally:
        head.stop()
