import random

import pytest

from eep_hpc.config import EngineConfig
from eep_hpc.engine.block_manager import BlockManager
from eep_hpc.engine.scheduler import Scheduler, SchedulerOutput
from eep_hpc.engine.sequence import Sequence, SequenceStatus
from eep_hpc.protocol import AddRequest, RequestOutput, SamplingParams
from support import model_token

EOS = 2


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_batched=64, max_model_len=1024, eos=(EOS,)) -> Scheduler:
    cfg = EngineConfig(block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched)
    return Scheduler(cfg, BlockManager(num_blocks, block_size), max_model_len, list(eos))


class FakeModel:
    """Writes (request, position, token) into a fake KV cache at the slots the scheduler gives it and checks, before
    sampling, that every earlier position of the sequence is still there: catches shared, lost or stale blocks."""

    def __init__(self, sched: Scheduler, sample=model_token) -> None:
        self.sched = sched
        self.cache: dict[int, tuple[str, int, int]] = {}
        self.sample = sample

    def run(self, out: SchedulerOutput) -> list[int | None]:
        bm = self.sched.block_manager
        sampled = []
        for s in out.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            tokens = seq.token_slice(start, end)
            for pos, slot, tok in zip(range(start, end), bm.slot_mapping(seq, start, end), tokens):
                self.cache[slot] = (seq.request_id, pos, tok)
            if s.needs_sample:
                expected = [(seq.request_id, p, t) for p, t in enumerate(seq.token_ids)]
                assert [self.cache[x] for x in bm.slot_mapping(seq, 0, end)] == expected
                sampled.append(self.sample(seq.request_id, seq.num_output_tokens))
            else:
                sampled.append(None)
        return sampled


def check_step(sched: Scheduler, out: SchedulerOutput, outputs: list[RequestOutput]) -> None:
    bm = sched.block_manager
    ids = [s.seq.request_id for s in out.scheduled]
    assert len(ids) == len(set(ids))
    assert out.num_batched_tokens == sum(s.num_new_tokens for s in out.scheduled) <= sched.max_num_batched_tokens
    assert all(s.num_new_tokens > 0 for s in out.scheduled)
    preempted = {s.request_id for s in out.preempted}
    assert not preempted & set(ids)
    assert not preempted & {o.request_id for o in outputs}
    assert len(sched.running) <= sched.max_num_seqs
    held = [b for s in sched.running for b in s.block_table]
    assert len(held) == len(set(held)) == bm.num_used_blocks
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    for s in sched.running:
        assert s.status is SequenceStatus.RUNNING
        assert s.num_computed_tokens < s.num_tokens and s.num_computed_tokens <= len(s.block_table) * bm.block_size
    for s in sched.waiting:
        assert s.status is SequenceStatus.WAITING and s.block_table == [] and s.num_computed_tokens == 0


def run_step(sched: Scheduler, model: FakeModel) -> tuple[SchedulerOutput, list[RequestOutput]]:
    waiting_before = list(sched.waiting)
    out = sched.schedule()
    admitted = [s.seq for s in out.scheduled if s.seq in waiting_before]
    rejected = {o.request_id for o in out.finished}
    in_line = [s for s in waiting_before if s.request_id not in rejected]
    assert admitted == in_line[: len(admitted)], "admitted out of order"
    assert not (out.preempted and admitted), "admitted into a cache that just had to preempt"
    outputs = sched.postprocess(out, model.run(out))
    check_step(sched, out, outputs)
    return out, outputs


def run_all(sched: Scheduler, model: FakeModel, max_steps=10_000) -> dict[str, RequestOutput]:
    """Steps until idle; returns each request's outputs merged into one."""
    merged: dict[str, RequestOutput] = {}
    for _ in range(max_steps):
        if not sched.has_work():
            return merged
        _, outputs = run_step(sched, model)
        for o in outputs:
            m = merged.setdefault(o.request_id, RequestOutput(request_id=o.request_id, new_token_ids=[]))
            assert m.finish_reason is None, f"{o.request_id} got output after finishing"
            m.new_token_ids += o.new_token_ids
            m.finish_reason, m.error = o.finish_reason, o.error
    raise AssertionError("scheduler did not finish")


def req(name: str, prompt_len: int, **sampling) -> Sequence:
    return Sequence(name, range(100, 100 + prompt_len), SamplingParams(**sampling))


# ---- batching -------------------------------------------------------------------------------------------------


def test_chunked_prefill_shares_batch_with_decode():
    sched = make(max_batched=8)
    model = FakeModel(sched)
    sched.add(req("a", 3, max_tokens=5))
    out, outputs = run_step(sched, model)
    assert [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled] == [("a", 3)]
    assert [o.new_token_ids for o in outputs] == [[model_token("a", 0)]]

    sched.add(req("b", 20, max_tokens=2))
    chunks = []
    for _ in range(3):
        out, outputs = run_step(sched, model)
        chunks.append([(s.seq.request_id, s.num_new_tokens) for s in out.scheduled])
        if len(chunks) < 3:
            assert [o.request_id for o in outputs] == ["a"]  # b is mid-prefill: nothing to report
    assert chunks == [[("a", 1), ("b", 7)], [("a", 1), ("b", 7)], [("a", 1), ("b", 6)]]
    assert sorted(o.request_id for o in outputs) == ["a", "b"]
    assert sched.get("b").num_computed_tokens == 20 and sched.get("b").num_output_tokens == 1


def test_max_num_seqs_and_fifo_admission():
    sched = make(max_num_seqs=2)
    model = FakeModel(sched)
    for name in "abcde":
        sched.add(req(name, 4, max_tokens=3))
    out, _ = run_step(sched, model)
    assert [s.seq.request_id for s in out.scheduled] == ["a", "b"]
    assert sched.num_running == 2 and sched.num_waiting == 3
    order = []
    while sched.has_work():
        out, _ = run_step(sched, model)
        order += [s.seq.request_id for s in out.scheduled if s.num_new_tokens == 4]
    assert order == ["c", "d", "e"]


def test_later_request_does_not_overtake_one_that_did_not_fit():
    sched = make(num_blocks=4, block_size=4, max_batched=64)
    model = FakeModel(sched)
    sched.add(req("a", 8, max_tokens=4))  # 2 blocks, grows to 3
    run_step(sched, model)
    sched.add(req("big", 9, max_tokens=1))  # needs 3 blocks, only 2 free
    sched.add(req("small", 1, max_tokens=1))  # would fit
    out, _ = run_step(sched, model)
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    assert [s.request_id for s in sched.waiting] == ["big", "small"]
    merged = run_all(sched, model)
    assert {k: v.finish_reason for k, v in merged.items()} == {"a": "length", "big": "length", "small": "length"}


# ---- preemption -----------------------------------------------------------------------------------------------


def test_preemption_under_tiny_cache_keeps_tokens_and_resumes_first():
    sched = make(num_blocks=6, block_size=4, max_batched=64)  # 24 slots
    model = FakeModel(sched)
    for name in "abc":
        sched.add(req(name, 4, max_tokens=10))
    merged: dict[str, list[int]] = {}
    kept: dict[str, list[int]] = {}
    resume_next = None
    while sched.has_work():
        out, outputs = run_step(sched, model)
        for o in outputs:
            merged.setdefault(o.request_id, []).extend(o.new_token_ids)
        if resume_next is not None and resume_next.status is SequenceStatus.RUNNING:
            assert resume_next.request_id in [s.seq.request_id for s in out.scheduled]
            resume_next = None
        if out.preempted:
            # Popped from the end of running, pushed to the front of waiting: they resume in running order.
            assert list(sched.waiting)[: len(out.preempted)] == out.preempted[::-1]
            for victim in out.preempted:
                assert victim.num_computed_tokens == 0 and victim.num_output_tokens > 0
                kept[victim.request_id] = list(victim.output_token_ids)
            resume_next = sched.waiting[0]
    assert out.preempted == [] and sched.num_preemptions >= 1 and "c" in kept
    for name, tokens in kept.items():
        assert merged[name][: len(tokens)] == tokens
    for name in "abc":
        assert merged[name] == [model_token(name, i) for i in range(10)]
    assert sched.block_manager.num_free_blocks == 6


def test_running_sequence_preempts_itself_when_last():
    sched = make(num_blocks=3, block_size=2, max_batched=64)
    model = FakeModel(sched)
    sched.add(req("a", 2, max_tokens=2))  # 1 block, then 2
    sched.add(req("b", 2, max_tokens=2))
    run_step(sched, model)  # both prefilled: one block left
    out, outputs = run_step(sched, model)  # a takes it; b cannot grow and is the last: it preempts itself
    assert [s.seq.request_id for s in out.scheduled] == ["a"]
    assert [s.request_id for s in out.preempted] == ["b"]
    merged = run_all(sched, model)
    assert merged["b"].new_token_ids == [model_token("b", 1)]  # its first token came in step one


def test_sequence_longer_than_cache_is_rejected_not_looped():
    sched = make(num_blocks=2, block_size=4)
    model = FakeModel(sched)
    sched.add(req("huge", 9))
    sched.add(req("ok", 3, max_tokens=2))
    out = sched.schedule()
    assert [o.request_id for o in out.finished] == ["huge"] and not out.is_empty
    outputs = sched.postprocess(out, model.run(out))
    assert outputs[0].finish_reason == "error" and "does not fit" in outputs[0].error
    assert sched.get("huge") is None
    assert run_all(sched, model)["ok"].finish_reason == "length"


def test_length_is_capped_by_the_cache():
    sched = make(num_blocks=2, block_size=4)  # 8 slots: prompt 3 + at most 6 outputs (the last is never computed)
    sched.add(req("a", 3, max_tokens=100))
    merged = run_all(sched, FakeModel(sched))
    assert merged["a"].finish_reason == "length" and len(merged["a"].new_token_ids) == 6


@pytest.mark.parametrize("seed", range(8))
def test_random_workload_completes_with_exact_tokens(seed):
    rng = random.Random(seed)
    sched = make(
        num_blocks=rng.randint(3, 12),
        block_size=rng.choice([1, 2, 4]),
        max_num_seqs=rng.randint(2, 6),
        max_batched=rng.randint(6, 40),
    )
    model = FakeModel(sched)
    capacity = sched.block_manager.capacity_tokens
    want: dict[str, int] = {}
    prompt_len: dict[str, int] = {}
    aborted: set[str] = set()
    merged: dict[str, list[int]] = {}
    finish: dict[str, str] = {}
    for step in range(3000):
        if step < 60 and rng.random() < 0.4:
            name = f"r{step}"
            sched.add(req(name, rng.randint(1, capacity // 2), max_tokens=rng.randint(1, capacity // 2)))
            want[name] = sched.get(name).sampling.max_tokens
            prompt_len[name] = sched.get(name).num_prompt_tokens
        if rng.random() < 0.03 and want:
            victim = rng.choice(sorted(want))
            for s in sched.abort([victim, "unknown"]):
                assert s.block_table == [] and s.finish_reason == "abort"
                aborted.add(s.request_id)
        if not sched.has_work() and step >= 60:
            break
        _, outputs = run_step(sched, model)
        for o in outputs:
            assert o.request_id not in finish
            merged.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason:
                finish[o.request_id] = o.finish_reason
    assert not sched.has_work()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    for name, max_tokens in want.items():
        tokens = merged.get(name, [])
        assert tokens == [model_token(name, i) for i in range(len(tokens))]
        if name not in aborted:
            assert finish[name] == "length"
            assert len(tokens) == min(max_tokens, capacity + 1 - prompt_len[name])


# ---- stop conditions ------------------------------------------------------------------------------------------


def generate(sched: Scheduler, seq: Sequence, script: list[int]) -> RequestOutput:
    sched.add(seq)
    model = FakeModel(sched, sample=lambda rid, i: script[i])
    return run_all(sched, model)[seq.request_id]


@pytest.mark.parametrize(
    "sampling, script, tokens, reason",
    [
        ({"max_tokens": 10}, [5, 6, EOS, 7], [5, 6, EOS], "stop"),
        ({"max_tokens": 4, "ignore_eos": True}, [5, EOS, 6, EOS, 7], [5, EOS, 6, EOS], "length"),
        ({"max_tokens": 10, "min_tokens": 3}, [EOS, 5, EOS, EOS], [EOS, 5, EOS], "stop"),
        ({"max_tokens": 10, "stop_token_ids": [7]}, [5, 6, 7, 8], [5, 6, 7], "stop"),
        ({"max_tokens": 10, "stop_token_ids": [7], "min_tokens": 2}, [7, 7, 8], [7, 7], "stop"),
        ({"max_tokens": 3}, [5, 6, 8, 9], [5, 6, 8], "length"),
        ({"max_tokens": 3}, [5, 6, EOS], [5, 6, EOS], "stop"),
    ],
)
def test_stop_conditions(sampling, script, tokens, reason):
    sched = make()
    out = generate(sched, req("a", 3, **sampling), script)
    assert (out.new_token_ids, out.finish_reason) == (tokens, reason)
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks


def test_max_model_len():
    sched = make(max_model_len=6)
    out = generate(sched, req("a", 3, max_tokens=100), list(range(10, 20)))
    assert (out.new_token_ids, out.finish_reason) == ([10, 11, 12], "length")


# ---- requests in and out --------------------------------------------------------------------------------------


def test_migrated_request_recomputes_its_outputs_and_counts_them():
    sched = make(max_batched=4)
    msg = AddRequest(
        request_id="m", prompt_token_ids=[100, 101, 102], sampling=SamplingParams(max_tokens=5), output_token_ids=[7, 8]
    )
    seq = Sequence.from_add_request(msg)
    assert (seq.num_prompt_tokens, seq.num_output_tokens, seq.num_tokens) == (3, 2, 5)
    out = generate(sched, seq, [None, None, 30, 31, 32, 33])
    assert (out.new_token_ids, out.finish_reason) == ([30, 31, 32], "length")
    assert seq.token_ids == [100, 101, 102, 7, 8, 30, 31, 32]


def test_abort_frees_blocks_and_ignores_unknown_ids():
    sched = make()
    model = FakeModel(sched)
    for name in "abc":
        sched.add(req(name, 5, max_tokens=50))
    run_step(sched, model)
    sched.add(req("d", 5))
    aborted = sched.abort(["b", "d", "nope"])
    assert [s.request_id for s in aborted] == ["b", "d"]
    assert all(s.finish_reason == "abort" and s.is_finished and not s.block_table for s in aborted)
    assert sched.num_running == 2 and sched.num_waiting == 0 and sched.get("b") is None
    assert sched.block_manager.num_used_blocks == sum(len(s.block_table) for s in sched.running)
    out = sched.schedule()
    sampled = model.run(out)
    sched.abort(["a"])  # while the step ran: its result is dropped
    outputs = sched.postprocess(out, sampled)
    assert [o.request_id for o in outputs] == ["c"]
    with pytest.raises(ValueError):
        sched.add(req("c", 1))


def test_empty_scheduler():
    sched = make()
    out = sched.schedule()
    assert out.is_empty and out.num_batched_tokens == 0 and not sched.has_work()
    assert sched.postprocess(out, []) == []
