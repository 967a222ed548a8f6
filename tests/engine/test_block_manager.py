import random

import pytest

from eep_hpc.engine.block_manager import BlockManager
from eep_hpc.engine.sequence import Sequence


def seq(name: str = "r") -> Sequence:
    return Sequence(name, [1])


def check_invariants(bm: BlockManager, live: list[Sequence]) -> None:
    held = [b for s in live for b in s.block_table]
    assert len(held) == len(set(held)), "a block is in two live tables"
    assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
    assert bm.num_used_blocks == len(held)
    assert all(bm.ref_counts[b] == 1 for b in held)
    assert sum(bm.ref_counts) == len(held)
    assert 0.0 <= bm.usage <= 1.0


def test_allocate_grows_by_whole_blocks():
    bm = BlockManager(num_blocks=4, block_size=4)
    s = seq()
    assert bm.allocate(s, 1) and len(s.block_table) == 1
    assert bm.allocate(s, 4) and len(s.block_table) == 1
    assert bm.allocate(s, 5) and len(s.block_table) == 2
    assert bm.allocate(s, 3) and len(s.block_table) == 2  # never shrinks
    assert bm.num_used_blocks == 2 and bm.usage == 0.5


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b = seq("a"), seq("b")
    assert bm.allocate(a, 4)
    assert not bm.allocate(b, 4)  # needs 2, 1 free
    assert b.block_table == [] and bm.num_free_blocks == 1
    assert not bm.can_allocate(a, 7) and bm.can_allocate(a, 6)
    assert not bm.allocate(a, 7)
    assert len(a.block_table) == 2 and bm.num_free_blocks == 1


def test_slot_mapping():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq("a"), seq("b")
    bm.allocate(a, 4)
    bm.allocate(b, 4)
    bm.allocate(a, 10)
    t = a.block_table
    assert bm.slot_mapping(a, 0, 10) == [t[p // 4] * 4 + p % 4 for p in range(10)]
    assert bm.slot_mapping(a, 9, 10) == [t[2] * 4 + 1]
    assert bm.slot_mapping(a, 3, 3) == []
    assert not set(bm.slot_mapping(a, 0, 12)) & set(bm.slot_mapping(b, 0, 4))
    with pytest.raises(IndexError):
        bm.slot_mapping(a, 0, 13)


def test_free_returns_blocks_and_clears_table():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq()
    bm.allocate(a, 7)
    bm.free(a)
    assert a.block_table == [] and bm.num_free_blocks == 4
    bm.free(a)  # nothing held: a no-op
    assert bm.num_free_blocks == 4


@pytest.mark.parametrize("seed", range(5))
def test_random_allocate_free_keeps_invariants(seed):
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=rng.randint(1, 20), block_size=rng.choice([1, 2, 4, 16]))
    live: list[Sequence] = []
    for step in range(300):
        if live and rng.random() < 0.3:
            s = live.pop(rng.randrange(len(live)))
            bm.free(s)
        elif live and rng.random() < 0.5:
            s = rng.choice(live)
            before = list(s.block_table)
            want = len(s.block_table) * bm.block_size + rng.randint(0, 3 * bm.block_size)
            ok = bm.allocate(s, want)
            assert s.block_table[: len(before)] == before
            assert (len(s.block_table) * bm.block_size >= want) if ok else (s.block_table == before)
        else:
            s = seq(f"s{step}")
            if bm.allocate(s, rng.randint(1, 3 * bm.block_size)):
                live.append(s)
            else:
                assert s.block_table == []
        check_invariants(bm, live)
    for s in live:
        bm.free(s)
    check_invariants(bm, [])
    assert bm.num_free_blocks == bm.num_blocks
