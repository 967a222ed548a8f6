"""One agreement per step across real rank processes (gloo): what each rank runs is agreed once per step, nothing
is asked of other ranks inside the layer loop, big steps run their MoE in agreed chunks, an idle rank takes part,
and the greedy tokens equal one rank's."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os

import pytest
import torch
import torch.distributed as dist

from eep_hpc import protocol as P
from eep_hpc.config import load_config
from eep_hpc.engine.rank_engine import build_engine
from eep_hpc.model.arch import load_arch
from eep_hpc.model.tiny import ensure_tiny_checkpoint
from eep_hpc.parallel import step_plan
from eep_hpc.parallel.groups import EpochGroup, connect_store
from eep_hpc.parallel.step_plan import GraphSizes, StepDemand, decide, encode

CHUNK = 8  # tokens per rank per MoE dispatch: the 20-token prompt below takes 3 chunks
PROMPTS = {0: [[5, 17, 3, 99, 41, 7, 250, 12, 64, 3, 8, 91, 33, 2, 71, 18, 150, 6, 27, 44]],  # one long prefill
           1: [[7, 7, 300], [11, 2]],  # two short ones
           2: []}  # idle throughout
MAX_TOKENS = 6


def _config():
    return load_config(None, parallel={"device": "cpu", "moe_chunk_tokens": CHUNK},
                       engine={"num_kv_blocks": 64, "enable_prefix_caching": False})


def _launch(rank_id: int, model_dir: str) -> P.RankLaunch:
    return P.RankLaunch(rank_id=rank_id, head_address="tcp://127.0.0.1:1", model_dir=model_dir, eos_token_ids=[],
                        device="cpu", config=_config())


def _epoch(num_ranks: int, port: int, num_layers: int, num_experts: int) -> P.Epoch:
    per = num_experts // num_ranks
    offsets = [i * per for i in range(num_ranks)] + [num_experts]
    return P.Epoch(epoch=1, rank_ids=list(range(num_ranks)), store_host="127.0.0.1", store_port=port,
                   physical_to_logical=[list(range(num_experts))] * num_layers, slot_offsets=offsets)


def _add(engine, prompts: list[list[int]], tag: str) -> None:
    sampling = P.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(P.AddRequest(request_id=f"{tag}{i}", prompt_token_ids=p, sampling=sampling))


def _worker(rank: int, num_ranks: int, port: int, model_dir: str, results) -> None:
    torch.set_num_threads(1)
    arch = load_arch(model_dir)
    store = connect_store("127.0.0.1", port)
    group = EpochGroup(store, 1, rank, num_ranks, torch.device("cpu"), timeout_s=60)
    engine = build_engine(_launch(rank, model_dir), _epoch(num_ranks, port, len(arch.moe_layers), arch.num_experts),
                          group)
    exchanges = 0
    exchange = group.all_to_all

    def counting_all_to_all(*args, **kwargs):
        nonlocal exchanges
        exchanges += 1
        return exchange(*args, **kwargs)

    group.all_to_all = counting_all_to_all
    _add(engine, PROMPTS.get(rank, []), f"r{rank}-")
    plans, per_step_host, per_step_exchanges, tokens = [], [], [], {}
    while True:
        before = group.host_collectives
        plan = step_plan.agree(group, engine.demand(), engine.graph_sizes(), engine.chunk_tokens)
        assert group.host_collectives == before + 1
        if not plan.busy:
            break
        plans.append(plan)
        before, ex = group.host_collectives, exchanges
        for out in engine.step(plan):
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
        per_step_host.append(group.host_collectives - before)
        per_step_exchanges.append(exchanges - ex)
    results[rank] = {"plans": plans, "host": per_step_host, "exchanges": per_step_exchanges, "tokens": tokens,
                     "steps": engine.steps, "moe_layers": len(arch.moe_layers)}
    group.destroy()


def _one_rank_tokens(model_dir: str) -> dict[str, list[int]]:
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    arch = load_arch(model_dir)
    group = EpochGroup(store, 1, 0, 1, torch.device("cpu"))
    engine = build_engine(_launch(0, model_dir), _epoch(1, store.port, len(arch.moe_layers), arch.num_experts), group)
    for rank, prompts in PROMPTS.items():
        _add(engine, prompts, f"r{rank}-")
    tokens: dict[str, list[int]] = {}
    while engine.has_work():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    return tokens


def _run_ranks(num_ranks: int, model_dir: str) -> list[dict]:
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_worker, args=(r, num_ranks, master.port, model_dir, results)) for r in range(num_ranks)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [results[r] for r in range(num_ranks)]


def _tokens_equal_one_ranks(res: list[dict], model_dir: str) -> None:
    want = _one_rank_tokens(model_dir)
    got = {k: v for r in res for k, v in r["tokens"].items()}
    assert got == {k: v for k, v in want.items() if int(k.split("-")[0][1:]) < len(res)}
    assert all(len(v) == MAX_TOKENS for v in got.values())


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_one_host_collective_per_step_and_agreed_chunks(num_ranks, tmp_path):
    model_dir = str(ensure_tiny_checkpoint(os.environ.get("EEP_HPC_CACHE")))
    res = _run_ranks(num_ranks, model_dir)

    # every rank took the same plan at every step (and so the same number of steps)
    assert all(r["plans"] == res[0]["plans"] for r in res)
    plans = res[0]["plans"]
    assert all(r["steps"] == len(plans) for r in res)
    # the step itself asks nobody anything: no host collective inside the layer loop
    assert all(h == 0 for r in res for h in r["host"])
    # the 20-token prefill ran its MoE in ceil(20 / CHUNK) = 3 agreed chunks on every rank, the idle one included;
    # each chunk is one dispatch (rows + slots) and one combine per MoE layer
    first = plans[0]
    assert (first.chunks, first.chunk_tokens, first.max_tokens) == (3, CHUNK, 20)
    layers = res[0]["moe_layers"]
    for r in res:
        assert r["exchanges"] == [3 * p.chunks * layers for p in plans]
    # greedy tokens equal one rank's serving every prompt
    _tokens_equal_one_ranks(res, model_dir)


def test_graph_steps_agree_once_and_capture_together_on_the_standin(monkeypatch):
    """The same on the CPU's stand-in of CUDA graphs (EEP_HPC_GRAPH_STANDIN=1: a replay, and a capture's warm-up,
    are eager forwards of the padded batch): the 20-token prefill runs eagerly in 3 chunks (mixed graphs only go up
    to the 8-token dispatch), then every decode step replays the agreed graph on every rank, the idle one included.
    One host collective per step; a replay runs one forward's exchanges, and the step that first meets the graph
    two (every rank captures it: the capture's warm-up runs the exchanges too). The greedy tokens equal one rank's."""
    monkeypatch.setenv("EEP_HPC_GRAPH_STANDIN", "1")
    model_dir = str(ensure_tiny_checkpoint(os.environ.get("EEP_HPC_CACHE")))
    res = _run_ranks(3, model_dir)
    plans = res[0]["plans"]
    assert all(r["plans"] == plans for r in res) and all(r["steps"] == len(plans) for r in res)
    assert all(h == 0 for r in res for h in r["host"])
    assert not plans[0].is_graph and plans[0].chunks == 3
    graphs = plans[1:]
    assert graphs and all(p.is_graph and not p.mixed and p.graph_size == 2 for p in graphs)  # 2: rank 1's batch
    assert [p.capture for p in graphs] == [True] + [False] * (len(graphs) - 1)
    layers = res[0]["moe_layers"]
    for r in res:
        assert r["exchanges"] == [3 * layers * (p.chunks if not p.is_graph else 2 if p.capture else 1)
                                  for p in plans]
    _tokens_equal_one_ranks(res, model_dir)


def test_plan_decisions():
    """The decision every rank takes from the element-wise maximum of their demands."""
    sizes = GraphSizes(decode=(1, 2, 4, 8, 16))
    both = [encode(StepDemand(tokens=3, seqs=3, busy=True), 0, 0), encode(StepDemand(), 0, 0)]
    values = [max(col) for col in zip(*both)]
    # decode-only and idle: one graph of the smallest size that holds the largest batch
    plan = decide(values, sizes, 256)
    assert plan.is_graph and plan.graph_size == 4
    # no graphs (CPU, or a backend that cannot be captured): eager, one chunk
    assert decide(values, GraphSizes(), 256) == step_plan.StepPlan(busy=True, chunks=1, chunk_tokens=3, max_tokens=3)
    # one rank prefills 600 tokens: nobody replays; three chunks of 256 on everyone
    prefill = encode(StepDemand(tokens=600, seqs=1, graphable=False, busy=True), 0, 0)
    plan = decide([max(col) for col in zip(prefill, both[0])], sizes, 256)
    assert not plan.is_graph and (plan.chunks, plan.chunk_tokens) == (3, 256)
    # a batch bigger than the largest graph runs eagerly
    assert not decide(encode(StepDemand(tokens=17, seqs=17, busy=True), 0, 0), sizes, 256).is_graph
    # nobody busy: the wave ends
    assert not decide(encode(StepDemand(), 0, 0), sizes, 256).busy
    # a prepare runs only when every member holds it (max == min); one lacking it keeps the group stepping
    holds, lacks = encode(StepDemand(busy=True), 7, 0), encode(StepDemand(busy=True), 0, 0)
    assert decide([max(c) for c in zip(holds, holds)], sizes, 256).prepare_epoch == 7
    plan = decide([max(c) for c in zip(holds, lacks)], sizes, 256)
    assert plan.prepare_epoch == 0 and plan.busy
    assert decide([max(c) for c in zip(encode(StepDemand(), 0, 9), encode(StepDemand(), 0, 9))],
                  sizes, 256).commit_epoch == 9
    # with mixed graphs: a step that is not decode-only replays the mixed graph that holds the most tokens of any
    # rank; above the largest one it runs eagerly
    with_mixed = GraphSizes(decode=(1, 2, 4, 8, 16), mixed=(32, 64, 128))
    small_prefill = encode(StepDemand(tokens=40, seqs=2, graphable=False, busy=True), 0, 0)
    plan = decide([max(col) for col in zip(small_prefill, both[0])], with_mixed, 256)
    assert plan == step_plan.StepPlan(busy=True, graph_size=64, mixed=True, chunk_tokens=64, max_tokens=40)
    assert decide(values, with_mixed, 256).graph_size == 4 and not decide(values, with_mixed, 256).mixed
    plan = decide([max(col) for col in zip(prefill, both[0])], with_mixed, 256)
    assert not plan.is_graph and (plan.chunks, plan.chunk_tokens) == (3, 256)


def test_a_rank_without_the_agreed_graph_makes_the_step_a_capture_round():
    """A rank that joined (or dropped its graphs at a commit) says which graphs it lacks; when the plan's graph is
    one of them, every rank learns it's a capture round (the lacking rank captures, the others replay once with no
    rows to partner its warm-up); a graph every rank has is replayed as usual."""
    sizes = GraphSizes(decode=(1, 2, 4, 8), mixed=(32, 64))
    kept = (0, 0, 0, 0, 0, 0)
    joined = (1, 1, 1, 1, 1, 1)
    half = (0, 1, 0, 1, 0, 1)  # captured 1, 4 and the mixed 32 since it joined
    busy = StepDemand(tokens=3, seqs=3, busy=True)

    def plan(*demands):
        return decide([max(col) for col in zip(*(encode(d, 0, 0) for d in demands))], sizes, 256)

    def with_missing(d, missing):
        return StepDemand(d.tokens, d.seqs, d.graphable, d.busy, missing)

    assert plan(with_missing(busy, kept), with_missing(StepDemand(), kept)) == step_plan.StepPlan(
        busy=True, graph_size=4, chunk_tokens=4, max_tokens=3)
    # the idle joiner lacks every graph: the busy member's step is a capture round
    p = plan(with_missing(busy, kept), with_missing(StepDemand(), joined))
    assert (p.graph_size, p.mixed, p.capture) == (4, False, True)
    # the joiner has size 4 by now, not size 8 nor the mixed 64
    assert not plan(with_missing(busy, kept), with_missing(StepDemand(), half)).capture
    eight = StepDemand(tokens=5, seqs=5, busy=True)
    assert plan(with_missing(eight, kept), with_missing(StepDemand(), half)).capture
    prefill = StepDemand(tokens=40, seqs=2, graphable=False, busy=True)
    p = plan(with_missing(prefill, kept), with_missing(StepDemand(), half))
    assert (p.graph_size, p.mixed, p.capture) == (64, True, True)
    p = plan(with_missing(StepDemand(tokens=20, seqs=2, graphable=False, busy=True), kept),
             with_missing(StepDemand(), half))
    assert (p.graph_size, p.mixed, p.capture) == (32, True, False)
    # eager steps and scaling actions are no capture rounds
    assert not plan(with_missing(StepDemand(tokens=600, seqs=1, graphable=False, busy=True), kept),
                    with_missing(StepDemand(), joined)).capture


def test_operators_see_steps_and_host_collectives(tmp_path):
    """Through a real head with 2 rank processes: every rank steps in lockstep (the same number of steps, one
    agreement per step or wave end), as /admin/state, /metrics and `eep-hpc status` report."""
    import httpx

    from support import metric, start_head, wait_until

    head = start_head(tmp_path, ranks=2)
    try:
        for i in range(6):
            r = httpx.post(f"{head.url}/v1/completions", timeout=60,
                           json={"model": head.model, "prompt": [3 + i, 7, 11], "max_tokens": 5, "temperature": 0})
            assert r.status_code == 200, r.text

        def settled():  # the ranks' stats arrive with their outputs and pongs: wait until both reported all steps
            ranks = head.state()["ranks"]
            steps = [r["steps"] for r in ranks]
            return ranks if len(set(steps)) == 1 and steps[0] >= 5 else None

        ranks = wait_until(settled, 30, "both ranks report the same step count")
        for r in ranks:
            # one host collective per agreement: each step (6 requests x 5 tokens, one after another), and beside
            # them only wave ends (at most 2 per request: a Wake can arrive before the request it is for) and the KV
            # sizing at start; a collective per layer would add at least one per step (30)
            assert r["steps"] >= 30 and r["steps"] <= r["host_collectives"] <= r["steps"] + 2 * 6 + 1, r
            rid = str(r["rank_id"])
            assert metric(head.url, "eep_hpc:rank_steps_total", rank=rid) == r["steps"]
            assert metric(head.url, "eep_hpc:rank_host_collectives_total", rank=rid) == r["host_collectives"]
            assert metric(head.url, "eep_hpc:rank_graph_steps_total", rank=rid) == r["graph_steps"] == 0  # CPU
        assert ranks[0]["host_collectives"] == ranks[1]["host_collectives"]
    finally:
        head.stop()


def test_a_plan_with_no_tokens_runs_no_forward_yet_answers_refused_requests(tmp_path):
    """Busy with nothing to run anywhere (here: the only request can never fit in the KV cache; in a scale event,
    ranks waiting for their expert reads): the plan has no tokens, the rank skips the forward, and the refusal
    still reaches the client, after which the rank is idle and schedules what comes next."""
    model_dir = str(ensure_tiny_checkpoint(tmp_path / "tiny"))
    arch = load_arch(model_dir)
    launch = P.RankLaunch(rank_id=0, head_address="tcp://127.0.0.1:1", model_dir=model_dir, eos_token_ids=[],
                          device="cpu", config=load_config(None, parallel={"device": "cpu"},
                                                           engine={"num_kv_blocks": 2, "block_size": 16}))
    engine = build_engine(launch, _epoch(1, 0, len(arch.moe_layers), arch.num_experts),
                          EpochGroup(None, 1, 0, 1, torch.device("cpu")))
    _add(engine, [list(range(1, 40))], "long-")  # 39 tokens against 32 in the cache
    demand = engine.demand()
    plan = decide(encode(demand, 0, 0), engine.graph_sizes(), engine.chunk_tokens)
    assert demand.busy and plan.busy and plan.max_tokens == 0
    steps = engine.steps
    outputs = engine.skip_step()
    assert engine.steps == steps
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("long-0", "error")]
    assert "does not fit in the KV cache" in outputs[0].error
    assert not engine.demand().busy
    _add(engine, [[5, 6, 7]], "short-")  # scheduled afresh: not stuck behind the skipped step
    assert engine.demand().tokens == 3
