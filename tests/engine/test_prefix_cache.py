"""Prefix caching: shared KV blocks keep ref counts and contents right through admission, growth, preemption,
abort and eviction; outputs are the same with and without it (block manager, scheduler, engine, HTTP)."""

from __future__ import annotations

import random

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eep_hpc import protocol as P
from eep_hpc.config import EngineConfig
from eep_hpc.engine.block_manager import BlockManager
from eep_hpc.engine.scheduler import Scheduler
from eep_hpc.engine.sequence import Sequence, SequenceStatus
from support import model_token, single_rank_engine, start_head, wait_until

# ---- block manager ------------------------------------------------------------------------------------------


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    counts = [0] * bm.num_blocks
    for s in live:
        assert len(s.block_table) == len(set(s.block_table)), "a block twice in one table"
        for b in s.block_table:
            counts[b] += 1
    assert bm.ref_counts == counts, "ref counts differ from the tables holding the blocks"
    assert set(bm._free) == {b for b in range(bm.num_blocks) if counts[b] == 0}
    assert bm.num_used_blocks == sum(1 for c in counts if c)
    for h, b in bm._cached.items():
        assert bm._hash_of[b] == h
    assert sum(1 for h in bm._hash_of if h is not None) == len(bm._cached)


class FakeKV:
    """What each cache slot holds: (position, token) of the sequence that wrote it."""

    def __init__(self, bm: BlockManager) -> None:
        self.bm, self.slots = bm, {}

    def compute(self, seq: Sequence, n: int) -> None:
        start, end = seq.num_computed_tokens, seq.num_computed_tokens + n
        for pos, slot in zip(range(start, end), self.bm.slot_mapping(seq, start, end)):
            block = slot // self.bm.block_size
            assert self.bm.ref_counts[block] == 1, f"{seq.request_id} writes into shared block {block}"
            self.slots[slot] = (pos, seq.token_slice(pos, pos + 1)[0])
        seq.num_computed_tokens = end
        self.bm.cache_computed_blocks(seq)

    def check(self, seq: Sequence) -> None:
        end = seq.num_computed_tokens
        got = [self.slots.get(s) for s in self.bm.slot_mapping(seq, 0, end)]
        assert got == list(enumerate(seq.token_slice(0, end))), f"{seq.request_id}: KV of another prefix"


PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 50, 60], [7, 7, 7, 7, 7, 7, 7, 7]]


@settings(max_examples=150, deadline=None)
@given(
    num_blocks=st.integers(2, 12),
    block_size=st.sampled_from([1, 2, 4]),
    ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2), st.integers(0, 6), st.integers(0, 10**6)),
                 max_size=80),
)
def test_block_manager_sharing_keeps_ref_counts_and_contents(num_blocks, block_size, ops):
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=True)
    kv = FakeKV(bm)
    live: list[Sequence] = []
    for step, (op, prefix, extra, pick) in enumerate(ops):
        if op == 0 or not live:  # admit a sequence sharing one of a few prefixes
            s = Sequence(f"s{step}", PREFIXES[prefix][: 2 + extra] + [100 + step] * (extra % 3))
            hit = bm.cached_prefix(s)
            assert len(hit) * block_size < s.num_tokens, "the last token must be computed"
            n = min(s.num_tokens - len(hit) * block_size, 1 + pick % 5)
            if bm.allocate(s, len(hit) * block_size + n, hit):
                assert s.num_computed_tokens == len(hit) * block_size
                kv.check(s)  # a hit brings exactly this prefix's KV
                kv.compute(s, n)
                live.append(s)
            else:
                assert s.block_table == [] and s.num_computed_tokens == 0
        elif op == 1:  # compute more of a live sequence (prompt, then outputs)
            s = live[pick % len(live)]
            if s.num_computed_tokens == s.num_tokens:
                s.output_token_ids.append(200 + pick % 3)
            n = min(s.num_tokens - s.num_computed_tokens, 1 + pick % 4)
            if bm.allocate(s, s.num_computed_tokens + n):
                kv.compute(s, n)
        elif op == 2:  # finish or abort
            bm.free(live.pop(pick % len(live)))
        else:  # preempt: blocks go, tokens stay; it comes back through the cache
            s = live.pop(pick % len(live))
            bm.free(s)
            s.num_computed_tokens = 0
        for s in live:
            kv.check(s)
        check_invariants(bm, live)
    for s in live:
        bm.free(s)
    check_invariants(bm, [])
    assert bm.num_free_blocks == num_blocks


def test_hit_takes_full_blocks_and_leaves_the_last_token():
    bm = BlockManager(8, 4, enable_prefix_caching=True)
    a = Sequence("a", range(12))
    assert bm.allocate(a, 12)
    a.num_computed_tokens = 12
    bm.cache_computed_blocks(a)
    assert bm.num_cached_blocks == 3
    same = Sequence("same", range(12))  # whole prompt cached: the last block is recomputed for its logits
    assert bm.cached_prefix(same) == a.block_table[:2]
    longer = Sequence("longer", range(14))
    assert bm.cached_prefix(longer) == a.block_table[:3]
    other = Sequence("other", [0, 1, 2, 3, 9, 5, 6, 7])  # differs in block 1: block 0 only
    assert bm.cached_prefix(other) == a.block_table[:1]
    assert bm.allocate(longer, 14, bm.cached_prefix(longer))
    assert longer.num_computed_tokens == 12 and longer.block_table[:3] == a.block_table[:3]
    assert [bm.ref_counts[b] for b in a.block_table] == [2, 2, 2]
    bm.note_admitted(longer, 12)
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == (14, 12)
    bm.free(a)
    bm.free(longer)
    assert bm.num_free_blocks == 8 and bm.num_cached_blocks == 3  # still reusable


def test_free_cached_blocks_are_evicted_last_and_leaf_first():
    bm = BlockManager(4, 2, enable_prefix_caching=True)
    a = Sequence("a", range(5))  # blocks: [0 1] [2 3] [4]; the first two get cached
    assert bm.allocate(a, 5)
    a.num_computed_tokens = 5
    bm.cache_computed_blocks(a)
    cached = a.block_table[:2]
    bm.free(a)
    b = Sequence("b", [9, 9])
    assert bm.allocate(b, 2)  # takes the uncached block first
    assert bm.num_cached_blocks == 2 and b.block_table[0] not in cached
    assert bm.allocate(b, 6)  # 2 more: the free uncached one, then the leaf of a's prefix
    assert bm.cached_prefix(Sequence("again", range(5))) == cached[:1]


def test_prefix_caching_off_never_shares():
    bm = BlockManager(8, 2)
    a = Sequence("a", range(6))
    bm.allocate(a, 6)
    a.num_computed_tokens = 6
    bm.cache_computed_blocks(a)
    assert bm.cached_prefix(Sequence("b", range(6))) == [] and bm.num_cached_blocks == 0


# ---- scheduler ------------------------------------------------------------------------------------------------


class SharedKVModel:
    """test_scheduler's FakeModel for shared blocks: a slot holds (position, token), checked before sampling."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched, self.kv = sched, {}

    def run(self, out):
        bm, sampled = self.sched.block_manager, []
        for s in out.scheduled:
            seq, start = s.seq, s.seq.num_computed_tokens
            end = start + s.num_new_tokens
            for pos, slot in zip(range(start, end), bm.slot_mapping(seq, start, end)):
                assert bm.ref_counts[slot // bm.block_size] == 1, "write into a shared block"
                self.kv[slot] = (pos, seq.token_slice(pos, pos + 1)[0])
            if s.needs_sample:
                assert [self.kv[x] for x in bm.slot_mapping(seq, 0, end)] == list(enumerate(seq.token_ids))
                sampled.append(model_token(seq.request_id, seq.num_output_tokens))
            else:
                sampled.append(None)
        return sampled


@pytest.mark.parametrize("seed", range(8))
def test_scheduler_shared_prompts_under_tiny_cache(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    cfg = EngineConfig(block_size=block_size, max_num_seqs=rng.randint(2, 6), max_num_batched_tokens=rng.randint(4, 30))
    bm = BlockManager(rng.randint(4, 14), block_size, enable_prefix_caching=True)
    sched = Scheduler(cfg, bm, 1024, [2])
    model = SharedKVModel(sched)
    system = [rng.randint(10, 99) for _ in range(bm.capacity_tokens // 3)]
    merged, finish, want = {}, {}, {}
    for step in range(4000):
        if step < 50 and rng.random() < 0.5:
            name = f"r{step}"
            prompt = system[: rng.randint(1, len(system))] + [rng.randint(10, 99) for _ in range(rng.randint(0, 3))]
            sched.add(Sequence(name, prompt, P.SamplingParams(max_tokens=rng.randint(1, 6))))
            want[name] = sched.get(name).sampling.max_tokens
        if rng.random() < 0.02 and sched.running:
            sched.abort([rng.choice(sched.running).request_id])
        if not sched.has_work() and step >= 50:
            break
        out = sched.schedule()
        if out.is_empty:
            continue
        for o in sched.postprocess(out, model.run(out)):
            merged.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason:
                finish[o.request_id] = o.finish_reason
        check_invariants(bm, sched.running)
        for s in sched.waiting:
            assert s.block_table == [] and s.num_computed_tokens == 0 and s.status is SequenceStatus.WAITING
    assert not sched.has_work() and bm.num_free_blocks == bm.num_blocks
    for name in want:
        tokens = merged.get(name, [])
        assert tokens == [model_token(name, i) for i in range(len(tokens))]
    assert bm.num_hit_tokens > 0


# ---- engine on a random HF checkpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen_checkpoint(tmp_path_factory):
    from support import save_random_hf_model

    return save_random_hf_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe"))


def engine_for(path, **engine):
    return single_rank_engine(path, 8, 2, **engine)


def run_engine(engine, prompts, max_tokens=12, arrive_every: int = 0):
    """Greedy tokens per prompt; with arrive_every, prompt i arrives at step i * arrive_every."""
    sampling = P.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    out = {str(i): [] for i in range(len(prompts))}
    pending, step = list(enumerate(prompts)), 0
    while pending or engine.has_work():
        while pending and pending[0][0] * arrive_every <= step:
            i, p = pending.pop(0)
            engine.add(P.AddRequest(request_id=str(i), prompt_token_ids=p, sampling=sampling))
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
        step += 1
    return [out[str(i)] for i in range(len(prompts))]


def shared_system_prompts(n: int, system_len: int = 40, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(256) for _ in range(system_len)]
    return [system + [rng.randrange(256) for _ in range(rng.randint(1, 9))] for _ in range(n)]


@pytest.mark.parametrize("num_kv_blocks, arrive_every", [(64, 2), (7, 1)])
def test_engine_greedy_same_with_and_without_prefix_caching(qwen_checkpoint, num_kv_blocks, arrive_every):
    # 7 blocks of 16 hold ~2 requests: constant eviction of cached blocks and preemption
    prompts = shared_system_prompts(8)
    prompts.append(list(prompts[0]))  # an exact repeat: all but the last block hit
    cfg = dict(num_kv_blocks=num_kv_blocks, max_num_batched_tokens=24)
    plain = engine_for(qwen_checkpoint, enable_prefix_caching=False, **cfg)
    cached = engine_for(qwen_checkpoint, **cfg)
    want = run_engine(plain, prompts, arrive_every=arrive_every)
    got = run_engine(cached, prompts, arrive_every=arrive_every)
    assert got == want
    stats = cached.stats()
    assert stats.prefix_cache_hits > 0 and stats.prefix_cache_hits <= stats.prefix_cache_queries
    assert plain.stats().prefix_cache_hits == 0
    assert cached.block_manager.num_used_blocks == 0
    if num_kv_blocks == 7:
        assert cached.scheduler.num_preemptions > 0


def test_engine_shared_system_prompt_hits(qwen_checkpoint):
    engine = engine_for(qwen_checkpoint, num_kv_blocks=64, max_num_batched_tokens=256)
    prompts = shared_system_prompts(6, system_len=48)
    run_engine(engine, prompts[:1], max_tokens=2)
    before = engine.stats()
    run_engine(engine, prompts[1:], max_tokens=2)
    s = engine.stats()
    # each later request finds the system prompt's 3 full blocks
    assert s.prefix_cache_hits - before.prefix_cache_hits == 5 * 48
    assert s.prefix_cache_queries - before.prefix_cache_queries == sum(len(p) for p in prompts[1:])


# ---- HTTP -----------------------------------------------------------------------------------------------------


def chat_texts(url: str, questions: list[str]) -> list[str]:
    texts = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for q in questions:
            messages = [{"role": "system", "content": "You are a helpful assistant. " * 6},
                        {"role": "user", "content": q}]
            r = client.post("/v1/chat/completions",
                            json={"messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["message"]["content"])
    return texts


def test_http_greedy_same_with_and_without_prefix_caching(api, tmp_path):
    questions = ["What is 2 + 2?", "Name a colour.", "What is 2 + 3?", "Name a colour."]
    hits_before = api.state()["ranks"][0]["prefix_cache_hits"]
    got = chat_texts(api.url, questions)
    plain = start_head(tmp_path, ranks=1, engine={"enable_prefix_caching": False})
    try:
        want = chat_texts(plain.url, questions)
    finally:
        plain.stop()
    assert got == want
    # the rank's counts reach the head with its step outputs and heartbeats
    wait_until(lambda: api.state()["ranks"][0]["prefix_cache_hits"] > hits_before, 10,
               f"the served rank counting prefix cache hits (was {hits_before})")
