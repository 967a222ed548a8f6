"""Expert placement: coverage, capacities, balance bound, stickiness across epochs, and the copy plan."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from eep_hpc.parallel.eplb import (
    CHECKPOINT,
    EMPTY,
    ExpertMove,
    Placement,
    align_previous,
    initial_placement,
    plan_moves,
    rebalance,
    replicate,
)

FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def zipf_load(num_layers: int, num_experts: int, s: float = 1.2, seed: int = 0) -> torch.Tensor:
    """[L, E] Zipf token counts, a different hot expert order per layer."""
    g = torch.Generator().manual_seed(seed)
    weights = 1000.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return torch.stack([weights[torch.randperm(num_experts, generator=g)] for _ in range(num_layers)])


def rank_loads(placement: Placement, load: torch.Tensor) -> torch.Tensor:
    """[L, R] tokens each rank serves: its replicas' load[e] / replicas(e), replicas counted in ``placement``."""
    per_replica = load.double() / placement.replica_counts.double()
    per_slot = per_replica.gather(1, placement.physical_to_logical)
    return torch.stack([per_slot[:, placement.slots_of(r)].sum(1) for r in range(placement.num_ranks)], 1)


def held(placement: Placement, layer: int) -> list[list[int]]:
    """Per rank position, the experts in its slots in ``layer``."""
    row = placement.physical_to_logical[layer].tolist()
    return [row[s.start : s.stop] for s in map(placement.slots_of, range(placement.num_ranks))]


def balance_bound(load: torch.Tensor, slots_per_rank: list[int]) -> torch.Tensor:
    """[L, R] the most each rank may serve: its fair share c_r * T / S plus (max - min) replica load.

    Replica loads are those of greedy replication, whose heaviest replica is the smallest any placement of S slots
    can have. The fair share is the capacity-relative lower bound; the slack is less than one heaviest replica.
    """
    load = load.double()
    caps = torch.tensor(slots_per_rank, dtype=torch.float64)
    weight = load / replicate(load, int(caps.sum()), len(slots_per_rank))
    fair = load.sum(1, keepdim=True) * caps / caps.sum()
    slack = weight.max(1, keepdim=True).values - weight.min(1, keepdim=True).values
    return fair + slack + 1e-9 * load.sum(1, keepdim=True)


def assert_valid(placement: Placement, num_experts: int, slots_per_rank: list[int]) -> None:
    """Every slot holds an expert, each rank exactly its slot count, every expert at least one replica per layer."""
    assert placement.slots_per_rank == slots_per_rank
    assert placement.physical_to_logical.shape[1] == sum(slots_per_rank)
    assert int(placement.physical_to_logical.min()) >= 0
    assert int(placement.physical_to_logical.max()) < num_experts
    assert bool((placement.replica_counts >= 1).all())


def apply_moves(old: Placement, old_ids: list[int], new_ids: list[int], slots: list[int], moves: list[ExpertMove]):
    """Replay a plan: start from what each slot held before (EMPTY for new ranks), check every source, copy."""
    table = align_previous(old, old_ids, new_ids, slots).physical_to_logical.clone()
    offsets = [0]
    for c in slots:
        offsets.append(offsets[-1] + c)
    for m in moves:
        assert m.logical in held(old, m.layer)[old_ids.index(m.src_rank)]
        j = new_ids.index(m.dst_rank)
        assert offsets[j] <= m.dst_slot < offsets[j + 1]
        table[m.layer, m.dst_slot] = m.logical
    return table


# ---------------------------------------------------------------- Placement and initial placement


def test_placement_helpers():
    p = Placement(torch.tensor([[0, 2, 0, 1, 3], [3, 2, 1, 0, 0]]), [0, 2, 5])
    assert (p.num_layers, p.num_slots, p.num_ranks, p.num_experts) == (2, 5, 2, 4)
    assert list(p.slots_of(1)) == [2, 3, 4] and p.slots_per_rank == [2, 3]
    assert [p.owner_of_slot(s) for s in range(5)] == [0, 0, 1, 1, 1]
    assert p.logical_to_physical(0) == [[0, 2], [3], [1], [4]]
    assert p.replica_counts.tolist() == [[2, 1, 1, 1], [2, 1, 1, 1]]
    assert p == Placement(p.physical_to_logical.clone(), [0, 2, 5]) and p != Placement(p.physical_to_logical, [0, 3, 5])
    with pytest.raises(ValueError):
        Placement(torch.zeros(1, 4, dtype=torch.int64), [0, 3])


def test_initial_placement_is_contiguous_round_robin():
    p = initial_placement(3, 5, [4, 2, 3])
    assert_valid(p, 5, [4, 2, 3])
    assert p.physical_to_logical.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]] * 3
    with pytest.raises(ValueError):
        initial_placement(1, 10, [4, 4])


# ---------------------------------------------------------------- rebalance: replicas and balance


def test_worked_example_from_module_docstring():
    load = torch.tensor([[60, 20, 10, 10]])
    assert replicate(load.double(), 5, 2).tolist() == [[2, 1, 1, 1]]
    p = rebalance(load, [2, 3])
    assert p.physical_to_logical.tolist() == [[0, 2, 0, 1, 3]] and p.slot_offsets == [0, 2, 5]
    assert rank_loads(p, load).tolist() == [[40.0, 60.0]]  # exactly the fair shares

    previous = align_previous(p, [10, 11], [11, 12], [3, 2])
    assert previous.physical_to_logical.tolist() == [[0, 1, 3, EMPTY, EMPTY]]
    q = rebalance(load, [3, 2], previous)
    assert q.physical_to_logical.tolist() == [[0, 1, 3, 0, 2]]
    assert plan_moves(p, [10, 11], q, [11, 12]) == [ExpertMove(0, 0, 10, 12, 3), ExpertMove(0, 2, 10, 12, 4)]


def test_replication_gives_spares_to_highest_load_per_replica():
    load = torch.tensor([[90.0, 30.0, 20.0, 0.0]])
    # 90/1 -> 90/2 = 45 -> 45 > 30 -> 90/3 = 30 ties 30 -> lowest id (0) -> 90/4 = 22.5 < 30 -> expert 1.
    assert replicate(load, 8, 8).tolist() == [[4, 2, 1, 1]]
    # At most one replica per rank while any expert is below that: 2 ranks cap expert 0 at 2 replicas.
    assert replicate(load, 6, 2).tolist() == [[2, 2, 1, 1]]


@pytest.mark.parametrize("slots_per_rank", [[10, 10, 10, 10], [6, 4, 8, 10, 12]])  # 40 slots, 32 experts
def test_zipf_load_within_bound_where_round_robin_fails(slots_per_rank):
    """Bound: every rank serves at most its fair share c_r * T / S plus (max - min) replica load (< one replica)."""
    load = zipf_load(num_layers=4, num_experts=32)
    bound = balance_bound(load, slots_per_rank)

    naive = initial_placement(4, 32, slots_per_rank)
    assert bool((rank_loads(naive, load) > bound).any()), "round robin should break the bound"

    p = rebalance(load, slots_per_rank)
    assert_valid(p, 32, slots_per_rank)
    assert bool((rank_loads(p, load) <= bound).all())
    fair_share = load.sum(1, keepdim=True) * torch.tensor(slots_per_rank) / sum(slots_per_rank)
    assert bool((rank_loads(p, load) <= 1.02 * fair_share).all())  # in practice much tighter than the bound


def test_uneven_capacities():
    load = torch.tensor([[5.0, 1, 1, 1, 8, 1, 1, 2], [0, 0, 0, 0, 0, 0, 0, 100]])
    caps = [4, 2, 6]
    p = rebalance(load, caps)
    assert_valid(p, 8, caps)
    assert bool((rank_loads(p, load) <= balance_bound(load, caps)).all())
    assert int(p.replica_counts[1, 7]) == 3  # the hot expert on every rank, once each
    for layer in range(2):
        for experts in held(p, layer):
            assert len(set(experts)) == len(experts), "no rank holds two replicas of an expert here"


def test_rejects_bad_inputs():
    with pytest.raises(ValueError):
        rebalance(torch.ones(1, 5), [2, 2])  # 4 slots < 5 experts
    with pytest.raises(ValueError):
        rebalance(-torch.ones(1, 2), [2])
    with pytest.raises(ValueError, match="align_previous"):
        rebalance(torch.ones(1, 4), [2, 2], previous=initial_placement(1, 4, [4]))


# ---------------------------------------------------------------- randomized properties

caps_st = st.lists(st.integers(0, 5), min_size=1, max_size=4).filter(lambda c: sum(c) >= 1)


@st.composite
def problems(draw):
    caps = draw(caps_st)
    num_experts = draw(st.integers(1, sum(caps)))
    num_layers = draw(st.integers(1, 2))
    values = st.one_of(st.integers(0, 1000), st.sampled_from([0, 1, 1000]))
    load = torch.tensor(draw(st.lists(st.lists(values, min_size=num_experts, max_size=num_experts),
                                      min_size=num_layers, max_size=num_layers)))
    return load, caps


@FAST
@given(problems())
def test_random_placements_are_valid_balanced_and_stable(problem):
    load, caps = problem
    num_layers, num_experts = load.shape
    p = rebalance(load, caps)
    assert_valid(p, num_experts, caps)
    assert rebalance(load, caps) == p  # deterministic
    assert rebalance(load, caps, previous=p) == p  # same inputs: zero moves
    assert plan_moves(p, list(range(len(caps))), rebalance(load, caps, p), list(range(len(caps)))) == []

    counts = replicate(load.double(), sum(caps), len(caps))
    assert torch.equal(p.replica_counts, counts)
    # The balance bound, wherever the no-duplicate rule cannot block a swap (every expert on fewer than all ranks).
    unblocked = counts.max(1).values < len(caps)
    assert bool((rank_loads(p, load) <= balance_bound(load, caps))[unblocked].all())

    # No duplicate that one swap with another rank could remove.
    for layer in range(num_layers):
        ranks = held(p, layer)
        for a, experts in enumerate(ranks):
            for e in {e for e in experts if experts.count(e) > 1}:
                others = [other for b, other in enumerate(ranks) if b != a and e not in other]
                assert all(y in experts for other in others for y in other)


@FAST
@given(problems(), st.integers(0, 2**16))
def test_rebalance_with_previous_is_a_fixed_point(problem, seed):
    load, caps = problem
    p = rebalance(load, caps)
    g = torch.Generator().manual_seed(seed)
    new_load = load.double() * torch.rand(load.shape, generator=g) * 2
    q = rebalance(new_load, caps, previous=p)
    assert_valid(q, load.shape[1], caps)
    assert rebalance(new_load, caps, previous=q) == q
    ids = [7 * i + 3 for i in range(len(caps))]
    assert torch.equal(apply_moves(p, ids, ids, caps, plan_moves(p, ids, q, ids)), q.physical_to_logical)


@FAST
@given(problems(), st.data())
def test_random_rank_removal(problem, data):
    load, caps = problem
    num_layers, num_experts = load.shape
    ids = list(range(100, 100 + len(caps)))
    old = rebalance(load, caps)
    leaving = data.draw(st.sampled_from(range(len(caps))))
    new_ids = ids[:leaving] + ids[leaving + 1 :]
    new_caps = caps[:leaving] + caps[leaving + 1 :]
    if sum(new_caps) < num_experts:
        return
    new = rebalance(load, new_caps, align_previous(old, ids, new_ids, new_caps))
    assert_valid(new, num_experts, new_caps)
    moves = plan_moves(old, ids, new, new_ids)
    assert torch.equal(apply_moves(old, ids, new_ids, new_caps, moves), new.physical_to_logical)
    for m in moves:
        old_ranks = held(old, m.layer)
        if not any(m.logical in old_ranks[ids.index(r)] for r in new_ids):  # only the leaving rank had it
            assert m.src_rank == ids[leaving]


# ---------------------------------------------------------------- epochs: ranks leave and join


def test_removing_a_rank_moves_only_what_it_held_alone():
    """Uniform load, so nothing needs rebalancing: the only copies are the experts only the departing rank held."""
    caps, ids = [4, 4, 4], [0, 1, 2]
    load = torch.ones(3, 8)
    old = rebalance(load, caps)
    new = rebalance(load, [4, 4], align_previous(old, ids, [0, 1], [4, 4]))
    assert_valid(new, 8, [4, 4])
    moves = plan_moves(old, ids, new, [0, 1])
    for layer in range(3):
        rank0, rank1, rank2 = map(set, held(old, layer))
        only_departing = rank2 - rank0 - rank1
        assert only_departing
        layer_moves = [m for m in moves if m.layer == layer]
        assert sorted(m.logical for m in layer_moves) == sorted(only_departing)
        assert all(m.src_rank == 2 and m.dst_rank in (0, 1) for m in layer_moves)


def test_removing_a_rank_under_skewed_load_keeps_most_slots():
    caps, ids = [6, 6, 6, 6], [3, 5, 8, 9]
    load = zipf_load(num_layers=4, num_experts=16, seed=1)
    old = rebalance(load, caps)
    new_ids, new_caps = [3, 5, 9], [6, 6, 6]
    previous = align_previous(old, ids, new_ids, new_caps)

    # Fewest possible copies: replicas of an expert can only stay in surviving slots that held it.
    counts = replicate(load.double(), 18, 3)
    kept_slots = torch.stack([(previous.physical_to_logical == e).sum(1) for e in range(16)], 1)
    fewest = int((counts - kept_slots).clamp(min=0).sum())
    placed_only = rebalance(load, new_caps, previous, slack=math.inf)
    assert len(plan_moves(old, ids, placed_only, new_ids)) == fewest

    # Balancing costs some more copies, still far fewer than placing from scratch.
    balanced = rebalance(load, new_caps, previous)
    assert bool((rank_loads(balanced, load) <= balance_bound(load, new_caps)).all())
    moves = plan_moves(old, ids, balanced, new_ids)
    assert fewest < len(moves) < len(plan_moves(old, ids, rebalance(load, new_caps), new_ids))
    assert any(m.src_rank == 8 for m in moves)


def test_adding_a_rank_fills_its_slots():
    caps, ids = [4, 4], [0, 1]
    load = zipf_load(num_layers=2, num_experts=8, seed=2)
    old = rebalance(load, caps)
    new_ids, new_caps = [0, 1, 2], [4, 4, 3]
    new = rebalance(load, new_caps, align_previous(old, ids, new_ids, new_caps))
    assert_valid(new, 8, new_caps)
    assert bool((rank_loads(new, load) <= balance_bound(load, new_caps)).all())
    moves = plan_moves(old, ids, new, new_ids)
    to_new_rank = [(m.layer, m.dst_slot) for m in moves if m.dst_rank == 2]
    assert sorted(to_new_rank) == [(layer, slot) for layer in range(2) for slot in new.slots_of(2)]
    assert all(m.src_rank in ids for m in moves)
    assert torch.equal(apply_moves(old, ids, new_ids, new_caps, moves), new.physical_to_logical)


def test_slack_trades_balance_for_fewer_moves():
    caps, ids = [8] * 4, [0, 1, 2, 3]
    load = zipf_load(num_layers=4, num_experts=24, s=1.0, seed=3)
    old = rebalance(load, caps)
    noisy = load * (0.7 + 0.6 * torch.rand(load.shape, generator=torch.Generator().manual_seed(4)))
    tight = plan_moves(old, ids, rebalance(noisy, caps, old), ids)
    loose_placement = rebalance(noisy, caps, old, slack=1.0)
    loose = plan_moves(old, ids, loose_placement, ids)
    assert len(loose) < len(tight)
    # With slack, a rank may exceed its fair share by slack * T / S if that is more than the (max - min) slack.
    fair_share = noisy.sum(1, keepdim=True) * 8 / sum(caps)
    per_slot = noisy.sum(1, keepdim=True) / sum(caps)
    bound = torch.maximum(balance_bound(noisy, caps), fair_share + per_slot)
    assert bool((rank_loads(loose_placement, noisy) <= bound).all())


# ---------------------------------------------------------------- plan_moves


def test_plan_moves_prefers_a_local_copy_then_the_least_loaded_sender():
    old = Placement(torch.tensor([[0, 1, 2, 0], [0, 1, 2, 0]]), [0, 2, 4])  # ids 5: [0, 1], 6: [2, 0]
    new = Placement(torch.tensor([[1, 1, 0, 2], [0, 1, 0, 2]]), [0, 2, 4])  # ids 5: [1, 1], 7: [0, 2]
    moves = plan_moves(old, [5, 6], new, [5, 7])
    assert moves == [
        ExpertMove(layer=0, logical=1, src_rank=5, dst_rank=5, dst_slot=0),  # rank 5 held 1 in its other slot
        ExpertMove(layer=0, logical=0, src_rank=5, dst_rank=7, dst_slot=2),  # on 5 and 6, none sent: earlier
        ExpertMove(layer=0, logical=2, src_rank=6, dst_rank=7, dst_slot=3),  # only 6 (leaving) held 2
        ExpertMove(layer=1, logical=0, src_rank=5, dst_rank=7, dst_slot=2),  # 5 and 6 have sent one each
        ExpertMove(layer=1, logical=2, src_rank=6, dst_rank=7, dst_slot=3),
    ]


def test_plan_moves_never_reads_from_a_lost_rank():
    """Rank 6 died: an expert it shared comes from the live replica, one only it held from the checkpoint."""
    old = Placement(torch.tensor([[0, 1, 2, 0]]), [0, 2, 4])  # ids 5: [0, 1], 6: [2, 0]
    new = Placement(torch.tensor([[0, 1, 2, 0]]), [0, 4])  # 5 alone: [0, 1, 2, 0]
    assert plan_moves(old, [5, 6], new, [5], lost={6}) == [
        ExpertMove(layer=0, logical=2, src_rank=CHECKPOINT, dst_rank=5, dst_slot=2),
        ExpertMove(layer=0, logical=0, src_rank=5, dst_rank=5, dst_slot=3),  # its own copy, not the dead one's
    ]
    assert plan_moves(old, [5, 6], new, [5])[0].src_rank == 6  # alive, it would have sent it


def test_plan_moves_raises_when_an_expert_has_no_holder():
    old = Placement(torch.tensor([[0, 1]]), [0, 1, 2])
    new = Placement(torch.tensor([[0, 2]]), [0, 2])
    with pytest.raises(ValueError, match="expert 2"):
        plan_moves(old, [0, 1], new, [0])
    with pytest.raises(ValueError):
        plan_moves(old, [0, 0], new, [0])
