"""A commit that keeps a rank's slot count (a rebalance, a recovery onto the same shapes) updates the live expert
tensors and routing tables in place: only the moved experts are staged, the tensors keep their addresses, and
on CUDA the captured graphs go on serving (nothing is re-captured), with the new placement's tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from support import engine_for, greedy
from eep_hpc.model.moe import ExpertParallel
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.parallel.all_to_all import TorchAllToAll
from eep_hpc.parallel.expert_map import ExpertMap
from eep_hpc.parallel.expert_transfer import SlotTensors, stage_experts
from eep_hpc.parallel.groups import EpochGroup

PROMPTS = [[3, 7, 11, 13], [5, 8, 2, 9, 21, 4], [17]]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))]


def swapped_placement(engine, layers: list[int]):
    """The moves and expert map of a placement that swaps the experts of local slots 0 and 1 in `layers`, and
    moves nothing elsewhere (what a rebalance on one rank does, in small)."""
    ep = engine.ep
    p2l = ep.map.physical_to_logical.tolist()
    moves = []
    for layer in layers:
        a, b = p2l[layer][0], p2l[layer][1]
        moves += [[layer, b, 0, 0, 0, 1], [layer, a, 0, 0, 1, 0]]
        p2l[layer][0], p2l[layer][1] = b, a
    num_experts = engine.model.arch.num_experts
    device = ep.map.slot_owner.device
    new_map = ExpertMap(p2l, [0, len(p2l[0])], 0, num_experts, device)
    return moves, ExpertParallel(new_map, TorchAllToAll(EpochGroup(None, 1, 0, 1, device)), num_experts)


@pytest.mark.parametrize("device", DEVICES)
def test_in_place_commit_keeps_tensors_and_graphs_and_tokens(device):
    engine = engine_for(Path(ensure_tiny_checkpoint()), device=device)
    want = greedy(engine, PROMPTS, 12)
    blocks = engine.model.moe_blocks()
    live = SlotTensors.of_blocks(blocks)
    pointers = [(t.data_ptr(), t.shape) for k in live.kinds() for t in k]
    old_ep, graphs = engine.ep, engine.runner.graphs
    captured = dict(graphs.graphs) if graphs is not None else {}
    swapped = blocks[0].w13[1].clone()

    moves, ep = swapped_placement(engine, layers=[0])
    S = blocks[0].w13.shape[0]
    staged, remote = stage_experts(0, moves, live, 0, S, len(blocks), (0, 0), blocks[0].w13.dtype,
                                   torch.device(device), like=live, in_place=True)
    assert remote == [] and staged.rows == [[0, 1]] + [[] for _ in blocks[1:]]  # only the moved experts staged
    assert ep.can_replace(old_ep)
    engine.swap_experts(staged, ep, keep_graphs=True)

    assert [(t.data_ptr(), t.shape) for k in SlotTensors.of_blocks(blocks).kinds() for t in k] == pointers
    assert torch.equal(blocks[0].w13[0], swapped)  # the expert of slot 1 now sits in slot 0
    assert engine.ep is ep and ep.route_table.data_ptr() == old_ep.route_table.data_ptr() and ep.load is old_ep.load
    assert ep.map.logical_to_physical.data_ptr() == old_ep.map.logical_to_physical.data_ptr()
    if graphs is not None:  # every graph kept, none captured again, and they serve the new placement
        assert graphs.graphs == captured and graphs.ep is ep
        replays = graphs.replays
    assert greedy(engine, PROMPTS, 12) == want
    if graphs is not None:
        assert graphs.replays > replays and graphs.graphs == captured


def test_commit_that_changes_shapes_replaces_tensors_and_drops_graphs():
    """Another slot count (a grow or shrink): the staged tensors replace the live ones; keeping graphs is refused."""
    engine = engine_for(Path(ensure_tiny_checkpoint()))
    want = greedy(engine, PROMPTS, 12)
    blocks = engine.model.moe_blocks()
    live = SlotTensors.of_blocks(blocks)
    moves, ep = swapped_placement(engine, layers=[0])
    S = blocks[0].w13.shape[0]
    with pytest.raises(ValueError, match="in-place staging"):
        stage_experts(0, moves, live, 0, S + 1, len(blocks), (0, 0), blocks[0].w13.dtype, torch.device("cpu"),
                      like=live, in_place=True)
    staged, _ = stage_experts(0, moves, live, 0, S, len(blocks), (0, 0), blocks[0].w13.dtype,
                              torch.device("cpu"), like=live)
    assert staged.rows is None
    with pytest.raises(ValueError, match="graphs are kept only"):
        engine.swap_experts(staged, ep, keep_graphs=True)
    engine.swap_experts(staged, ep)
    assert blocks[0].w13.data_ptr() == staged.w13[0].data_ptr() and engine.ep is ep
    assert greedy(engine, PROMPTS, 12) == want


def test_a_new_communicator_or_other_shapes_cannot_replace():
    engine = engine_for(Path(ensure_tiny_checkpoint()))
    _, ep = swapped_placement(engine, layers=[0])
    assert ep.can_replace(engine.ep)

    class NewComm(TorchAllToAll):  # a multi-rank epoch's communicator: a captured graph cannot serve another
        graph_key = None

    other = ExpertParallel(ep.map, NewComm(EpochGroup(None, 1, 0, 1, torch.device("cpu"))), ep.load.shape[1])
    assert not other.can_replace(engine.ep)
    E = engine.model.arch.num_experts
    L = len(engine.model.moe_blocks())
    wider = ExpertMap([list(range(E)) + [0]] * L, [0, E + 1], 0, E)  # one redundant slot: other table shapes
    assert not ExpertParallel(wider, TorchAllToAll(EpochGroup(None, 1, 0, 1, torch.device("cpu"))), E).can_replace(
        engine.ep)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_capture_rounds_leave_tokens_and_load_unchanged(monkeypatch):
    """A rank that has the agreed graph while another captures it replays it once with no rows first (the partner
    of the capture's warm-up, parallel/step_plan.py): that replay writes no KV, counts no load and changes no token.
    What a rank lacks is what it tells the agreement: nothing after startup, everything after a reset."""
    import dataclasses

    engine = engine_for(Path(ensure_tiny_checkpoint()), device="cuda")
    graphs = engine.runner.graphs
    sizes = engine.graph_sizes()
    assert engine.demand().missing == (0,) * (len(sizes.decode) + len(sizes.mixed)) and sizes.decode
    engine.ep.take_load()
    want = greedy(engine, PROMPTS, 12)
    want_load = engine.ep.take_load()
    replays = graphs.replays

    alone = engine.plan_alone
    monkeypatch.setattr(engine, "plan_alone", lambda: dataclasses.replace(alone(), capture=alone().is_graph))
    assert greedy(engine, PROMPTS, 12) == want
    assert torch.equal(engine.ep.take_load(), want_load)
    assert graphs.partner_replays == graphs.replays - replays > 0  # one per graph step of the second run

    graphs.reset()
    assert engine.demand().missing == (1,) * (len(sizes.decode) + len(sizes.mixed))
    assert greedy(engine, PROMPTS, 12) == want  # each size captured on first use
    assert 0 in engine.demand().missing and 1 in engine.demand().missing
