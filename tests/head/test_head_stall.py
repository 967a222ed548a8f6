"""A head whose event loop is starved (far behind its streams, as one bench-head run with 2,048 streams was) keeps its
ranks: its pings come from a thread of its own (head/beacon.py), so a rank does not take the head's silent loop for
a head that is gone (control.head_timeout_s) and exit.

The starving here is a computation the test puts on the head's own event loop (the head runs in a thread of the
test process, support.start_head): it holds the loop, and the GIL between switches, for twice head_timeout_s.
"""

from __future__ import annotations

import asyncio
import time

from support import alive, rank_pids, reference_texts, run_load, start_head, until

MAX_TOKENS = 32
HEAD_TIMEOUT_S = 3.0


def test_ranks_stay_while_the_heads_event_loop_is_starved(tmp_path):
    head = start_head(tmp_path, ranks=2, control={"head_timeout_s": HEAD_TIMEOUT_S, "heartbeat_s": 0.5})
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS))
        pids = rank_pids(head)
        held: list[float] = []

        def hold_the_loop(seconds: float) -> None:  # runs on the head's event loop: nothing else of it runs meanwhile
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                pass
            held.append(time.monotonic() - start)

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=4))
            await until(lambda: any(r["requests_in_flight"] for r in head.state()["ranks"]), 60, "requests in flight")
            head.loop.call_soon_threadsafe(hold_the_loop, 2 * HEAD_TIMEOUT_S)
            await until(lambda: held, 60, "the head's loop to be held and let go")  # no HTTP to the head meanwhile
            # after the hold: the streams that were open go on, new ones start, on the same rank processes
            await asyncio.sleep(2.0)
            stop.set()
            return await load

        result = asyncio.run(scenario())
        assert held[0] >= 2 * HEAD_TIMEOUT_S
        assert result.failures == [], result.failures[:5]
        assert result.completed > 0
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
        assert asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS)) == reference
        state = head.state()
        assert rank_pids(head) == pids and all(alive(p) for p in pids.values())
        assert [r["state"] for r in state["ranks"]] == ["READY", "READY"], state["ranks"]
        assert [e for e in state["scale_events"] if e["kind"] == "recover"] == []
    finally:
        head.stop()


def test_a_rank_whose_first_epoch_outlasts_the_head_timeout_stays(tmp_path):
    """A GPU rank enters its first epoch deaf to the head (loading, warming up, capturing graphs: 26 s for two
    ranks sharing an H100) while the head's pings queue up: those count as heard, and the rank serves."""
    head = start_head(tmp_path, ranks=2, parallel={"rank_engine": "standin"},
                      standin={"startup_s": 2 * HEAD_TIMEOUT_S},
                      control={"head_timeout_s": HEAD_TIMEOUT_S, "heartbeat_s": 0.5})
    try:
        pids = rank_pids(head)
        time.sleep(HEAD_TIMEOUT_S)  # a rank that took itself for orphaned would be gone by now
        assert all(alive(p) for p in pids.values())
        r = asyncio.run(reference_texts(head.url, head.model, 8))
        assert len(r) > 1 and all(r), r
        assert [x["state"] for x in head.state()["ranks"]] == ["READY", "READY"]
    finally:
        head.stop()
