"""Expert parallelism across real rank processes: the same greedy text on 1-4 ranks and across a rebalance."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re

import httpx
import pytest

from support import reference_texts, run_load
from support import admin_steps_under_load, start_head, wait_until

from eep_hpc import cli

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def single_rank_reference(api):
    return asyncio.run(reference_texts(api.url, api.model, MAX_TOKENS))


@pytest.mark.parametrize("ranks", [2, 3, 4])
def test_greedy_text_identical_across_rank_counts(ranks, single_rank_reference, tmp_path):
    head = start_head(tmp_path, ranks=ranks)
    try:
        state = head.state()
        assert len(state["members"]) == ranks
        offsets = state["placement"]["slot_offsets"]
        assert len(offsets) == ranks + 1
        for row in state["placement"]["physical_to_logical"]:
            assert set(row) == set(range(8)), "every expert needs a slot"
        before = {r["rank_id"]: r for r in state["ranks"]}
        got = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        assert got == single_rank_reference
        # Requests were spread over the ranks (routing by load): each admitted prompts of its own. And every rank
        # ran every MoE layer with the others: the ranks of an epoch step together (each step's dispatch and
        # combine are collectives of all members), so every rank's step count grew, by the same number. A rank
        # that skipped steps, or that others' tokens never reached, would fall behind or hang the others.
        # (Counts reach the head with step outputs and heartbeats: wait until every rank has reported its last.)
        def settled():
            now = {r["rank_id"]: r for r in head.state()["ranks"]}
            grew = {rid: r["steps"] - before[rid]["steps"] for rid, r in now.items()}
            return grew if len(set(grew.values())) == 1 and min(grew.values()) > 0 else None

        grew = wait_until(settled, 15, lambda: "every rank stepping as often as the others: steps "
                          + str({r["rank_id"]: r["steps"] for r in head.state()["ranks"]}))
        assert min(grew.values()) >= MAX_TOKENS  # at least one step per generated token
        after = {r["rank_id"]: r for r in head.state()["ranks"]}
        admitted = {rid: after[rid]["prefix_cache_queries"] - before[rid]["prefix_cache_queries"] for rid in after}
        assert all(n > 0 for n in admitted.values()), f"a rank served no request of its own: {admitted}"
        assert all(r["state"] == "READY" for r in after.values())
    finally:
        head.stop()


def test_rebalance_while_streaming_keeps_text(tmp_path):
    """Each rank keeps its slot count, so commits stage only the moved experts and copy them into the live slots
    (on nixl_ep the CUDA graphs are kept too; torch's multi-rank epochs have a new communicator each). The moved
    experts are read over NIXL while the ranks keep serving: capped at 100 kB/s here, a rank's reads take a good
    part of a second, and every member serves steps meanwhile (the length of the stop itself is a benchmark
    figure: results/README.md)."""
    ranks = 3
    head = start_head(tmp_path, ranks=ranks, parallel={"redundant_experts": 1, "transfer_gbps": 0.0001})
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        before = head.state()["placement"]

        result, events = admin_steps_under_load(head, [("rebalance", {})] * 3, MAX_TOKENS, streams=8, pause_s=0.5)
        assert result.failures == []
        assert result.completed > 0
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts), f"prompt {k} changed across rebalances"
        # a rebalance whose placement is the serving one runs no event and keeps the epoch
        assert all(e["phase"] in ("DONE", "UNCHANGED") for e in events), events
        read = [e for e in events if e["phase"] == "DONE" and e["bytes_moved"]]
        assert read, events
        for e in read:  # serving went on while the experts arrived (every member stepped meanwhile)
            assert e["served_while_preparing"] > 0, e
        after = head.state()
        assert after["epoch"] == sum(e["phase"] == "DONE" for e in events)
        # the skewed load of real traffic moved replicas: the hot experts now hold the redundant slot
        assert after["placement"] != before or any(e["experts_moved"] for e in events)
        logs = "".join(p.read_text(errors="replace") for p in (tmp_path / "jobs").rglob("*") if p.is_file())
        commits = logs.count("updated in place")
        assert commits == ranks * after["epoch"], logs[-3000:]
        assert "step path kept" not in logs
    finally:
        head.stop()


def test_ranks_of_different_shapes_get_expert_slots_by_capacity(tmp_path):
    from eep_hpc.head.membership import slots_per_rank

    assert slots_per_rank(8, 0, [1.0, 1.0, 1.0]) == [3, 3, 2]
    assert slots_per_rank(8, 0, [1.0, 2.0]) == [3, 5]
    assert slots_per_rank(128, 4, [1.0, 2.0, 0.5]) == [38, 75, 19]
    # the same total at every size (the expert tables keep their shapes across grows and shrinks)
    assert {sum(slots_per_rank(128, 8, [1.0] * n)) for n in range(1, 9)} == {136}
    assert slots_per_rank(8, 0, [1.0, 1.0, 1.0, 10.0]) == [1, 1, 1, 5]  # raised to one slot, taken from the largest
    pools = {"big": {"expert_capacity": 2.0}, "small": {"expert_capacity": 1.0}}
    head = start_head(tmp_path, ranks=1, pools=pools)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        r = httpx.post(f"{head.url}/admin/scale/grow", json={"pools": {"big": 1, "small": 1}}, timeout=300)
        assert r.status_code == 200, r.text
        assert (r.json()["from_ranks"], r.json()["to_ranks"]) == (1, 3)  # one event for both pools
        offsets = head.state()["placement"]["slot_offsets"]
        sizes = [b - a for a, b in zip(offsets, offsets[1:])]
        assert sizes == [2, 4, 2]  # 8 experts over capacities 1 : 2 : 1
        assert asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS)) == reference
        bad = httpx.post(f"{head.url}/admin/scale/grow", json={"pools": {"huge": 1}})
        assert bad.status_code == 400 and "unknown pool" in bad.json()["error"]["message"]
    finally:
        head.stop()


async def _scale_under_load(head, kind: str, body: dict, watch, streams: int):
    """POST /admin/scale/<kind> while `streams` clients stream; `watch(scaling)` sees the head's state of the
    event every 0.2 s until it ends -> (the load's result, the response, what watch returned, Nones left out)."""
    stop = asyncio.Event()
    load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=streams))
    await asyncio.sleep(0.5)
    async with httpx.AsyncClient(timeout=300) as client:
        event = asyncio.create_task(client.post(f"{head.url}/admin/scale/{kind}", json=body))
        seen = []
        while not event.done():
            scaling = (await client.get(f"{head.url}/admin/state")).json()["scaling"]
            if scaling and (got := watch(scaling)) is not None:
                seen.append(got)
            await asyncio.sleep(0.2)
        r = await event
    await asyncio.sleep(0.5)
    stop.set()
    return await load, r, seen


def _done_with_the_same_texts(head, r, result, reference) -> dict:
    """The event committed (epoch 1), no request failed, every text is the reference's -> the event."""
    assert r.status_code == 200, r.text
    event = r.json()
    assert event["phase"] == "DONE", event
    assert result.failures == []
    for k, texts in result.texts.items():
        assert all(t == reference[k] for t in texts), f"prompt {k} changed across the {event['kind']}"
    assert head.state()["epoch"] == 1
    return event


def test_a_shrink_whose_reads_outlast_the_prepare_timeout_finishes_while_they_progress(tmp_path):
    """The survivor of a shrink reads every expert of the leaving rank in the background of serving; capped here
    so that this takes several times the head's prepare timeout (2 x control.event_timeout_s). The reads report
    their progress, the head waits as long as it comes, and the shrink commits with no request failed. (Before:
    the head gave up after 2 x event_timeout_s and rolled back; and the rank's abort then waited for its READs in
    flight while its peer timed out in the step agreement: the group broke, the H200 lab's shrink of 2026-12-06.)"""
    head = start_head(tmp_path, ranks=2, parallel={"transfer_gbps": 0.000025}, control={"event_timeout_s": 1.5})
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        status = []

        def watch(scaling: dict) -> tuple[int, int] | None:
            if "reads_total" not in scaling:
                return None
            if not status:  # about 1 s into reads of about 8 s: `eep-hpc status` says how far
                out = io.StringIO()
                with contextlib.redirect_stdout(out):
                    assert cli.main(["status", "--url", head.url]) == 0
                status.append(out.getvalue())
            return scaling["reads_received"], scaling["reads_total"]

        result, r, seen = asyncio.run(_scale_under_load(head, "shrink", {"n": 1}, watch, streams=6))
        status = status[0] if status else ""
        event = _done_with_the_same_texts(head, r, result, reference)
        assert event["prepare_s"] > 2 * 1.5, event  # the reads outlasted the old deadline
        # the survivor's progress, as the head's state showed it while the reads went on
        assert seen and all(0 < got <= total == event["bytes_moved"] for got, total in seen), (seen, event)
        assert len({got for got, _ in seen}) > 1, seen
        total = f"{event['bytes_moved'] / 2**20:.2f}"
        assert re.search(rf"scaling now: shrink to epoch 1 \(preparing, weight reads 0\.\d\d of {total} MiB \(\d+%\)\)",
                         status), status
    finally:
        head.stop()


def test_a_grow_whose_dense_read_outlasts_the_staging_timeout_finishes_while_it_progresses(tmp_path):
    """A joiner reads its dense weights from a serving peer before it says RankStaged; capped here (the cap
    applies to a joiner's dense read too) so that the read takes longer than the head's wait for RankStaged
    (4 x control.event_timeout_s). The joiner reports its progress, the head waits as long as it comes, and the
    grow commits with no request failed. (Before: the head gave up at that deadline: the H100 lab's grow 2 -> 3,
    whose 2 GB of dense weights crossed the loopback socket while both peers served.)"""
    head = start_head(tmp_path, ranks=1, parallel={"transfer_gbps": 0.00004}, control={"event_timeout_s": 1.0})
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))

        def watch(scaling: dict) -> tuple[int, int] | None:  # before any expert is read: the dense read
            if "reads_total" not in scaling or scaling["dense_bytes"]:
                return None
            return scaling["reads_received"], scaling["reads_total"]

        result, r, seen = asyncio.run(_scale_under_load(head, "grow", {"n": 1}, watch, streams=4))
        event = _done_with_the_same_texts(head, r, result, reference)
        assert event["dense_source"] == "nixl:0", event
        assert event["prepare_s"] > 4 * 1.0, event  # the dense read alone outlasted the old deadline
        assert seen and all(0 < got <= total == event["dense_bytes"] for got, total in seen), (seen, event)
        assert len({got for got, _ in seen}) > 1, seen
    finally:
        head.stop()
