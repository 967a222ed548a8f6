"""The outputs a stream's writer finds queued are merged into one (serve/output_queue.py): tokens and logprobs in
order, the last finish; an error or abort end, prompt logprobs and misaligned logprobs stay apart."""

from __future__ import annotations

import asyncio

from eep_hpc import protocol as P
from eep_hpc.serve.output_queue import OutputQueue


def out(ids, finish=None, error="", lp=True, prompt=None) -> P.RequestOutput:
    logprobs = P.Logprobs(token_logprobs=[-float(t) for t in ids], top_ids=[[t, t + 1] for t in ids],
                          top_logprobs=[[-float(t), -float(t) - 1] for t in ids]) if lp else None
    return P.RequestOutput(request_id="r", new_token_ids=list(ids), finish_reason=finish, error=error,
                           logprobs=logprobs, prompt_logprobs=prompt)


def drain(items: list[P.RequestOutput]) -> list[P.RequestOutput]:
    async def run():
        q = OutputQueue()
        for o in items:
            q.put_nowait(o)
        got = []
        while not got or got[-1].finish_reason is None:
            got.append(await q.get())
        return got

    return asyncio.run(run())


def test_a_writer_that_keeps_up_gets_each_output_as_it_came():
    async def run():
        q, got = OutputQueue(), []

        async def writer():
            while not got or got[-1].finish_reason is None:
                got.append(await q.get())

        task = asyncio.create_task(writer())
        for o in [out([1]), out([2]), out([3], "length")]:
            q.put_nowait(o)
            await asyncio.sleep(0)  # the writer runs before the next output comes
        await task
        return got

    got = asyncio.run(run())
    assert [o.new_token_ids for o in got] == [[1], [2], [3]]


def test_queued_outputs_merge_in_order_with_their_logprobs_and_the_last_finish():
    prompt = P.Logprobs(token_logprobs=[-0.5], top_ids=[[9]], top_logprobs=[[-0.5]])
    (one,) = drain([out([1], prompt=prompt), out([2, 3]), out([4]), out([5], "stop")])
    assert one.new_token_ids == [1, 2, 3, 4, 5] and one.finish_reason == "stop"
    assert one.logprobs.token_logprobs == [-1.0, -2.0, -3.0, -4.0, -5.0]
    assert one.logprobs.top_ids == [[t, t + 1] for t in [1, 2, 3, 4, 5]]
    assert one.prompt_logprobs == prompt
    (plain,) = drain([out([1], lp=False), out([2], lp=False), out([], "length", lp=False)])
    assert plain.new_token_ids == [1, 2] and plain.logprobs is None and plain.finish_reason == "length"


def test_error_and_abort_ends_prompt_logprobs_and_misaligned_logprobs_stay_apart():
    got = drain([out([1]), out([2]), out([], "abort", "server shutting down", lp=False)])
    assert [(o.new_token_ids, o.finish_reason) for o in got] == [([1, 2], None), ([], "abort")]
    got = drain([out([1]), out([], "error", "rank failed", lp=False)])
    assert [o.finish_reason for o in got] == [None, "error"]
    prompt = P.Logprobs(token_logprobs=[-0.5], top_ids=[[9]], top_logprobs=[[-0.5]])
    got = drain([out([1]), out([2], prompt=prompt), out([3], "length")])
    assert [o.new_token_ids for o in got] == [[1], [2, 3]]
    got = drain([out([1]), out([2], lp=False), out([3], "length", lp=False)])
    assert [o.new_token_ids for o in got] == [[1], [2, 3]]


def test_a_sink_takes_outputs_only_while_the_writer_waits_with_none_queued():
    """Taken outputs never reach `get`; a declined one wakes the writer, and the sink sees nothing until the writer
    waits again with nothing queued (the outputs keep their order)."""
    async def run():
        seen, got = [], []

        def sink(o):
            seen.append(o.new_token_ids[0])
            return o.new_token_ids[0] % 2 == 1  # takes odd tokens

        q = OutputQueue(sink)
        q.put_nowait(out([1], lp=False))  # no writer waiting yet: queued
        task = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        got.append(task.result())
        waiting = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        for t in (3, 5, 6, 7):  # 3, 5 taken; 6 declined wakes it; 7 queued behind it, not offered
            q.put_nowait(out([t], lp=False))
        got.append(await waiting)
        return seen, [o.new_token_ids for o in got]

    seen, got = asyncio.run(run())
    assert seen == [3, 5, 6]
    assert got == [[1], [6, 7]]


def test_a_sink_that_raises_fails_the_writer_not_the_dispatcher():
    async def run():
        def sink(o):
            raise ValueError("boom")

        q = OutputQueue(sink)
        waiting = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        q.put_nowait(out([1], lp=False))  # does not raise here
        try:
            await waiting
        except ValueError as e:
            return str(e), q.sink

    assert asyncio.run(run()) == ("boom", None)
