"""The fused MoE router (`routing.route_topk_triton`) against the torch composition it replaces.

Conventions as tests/kernels/test_kernels.py: Triton tests run on a CUDA GPU, or without one on the CPU in Triton's
interpreter (see kernel_checks.py). Each check draws fresh random inputs. The outputs are allocated by the kernel's
wrapper, so instead of poisoning them the checks compare every entry exactly with the reference (slots, load
counts) or within 1e-6 relative (fp32 weights).

Logits are drawn with no ties among each row's top k + 1 (so the reference's order is defined), the load row
starts from random counts (the kernel adds, never overwrites) and the tables are rows of [L, E, R] tables (as the
model passes `load[layer]`), with and without replicated experts. The production setting, bf16 logits from a bf16
gate (ties included) and bf16 weights, has its own test (`test_route_topk_triton_bf16_gate`).
"""

from __future__ import annotations


import pytest
import torch

from kernel_checks import DEVICE, DTYPES, INTERPRET, needs_cuda, needs_kernels

from eep_hpc.kernels.routing import route_topk, route_topk_reference

WEIGHT_RTOL = 1e-6
# tables for 3 MoE layers, routing layer 1 (row views with an offset)
LAYERS, LAYER = 3, 1


@pytest.fixture(autouse=True)
def _few_programs_in_the_interpreter(monkeypatch):
    """The interpreter runs programs one after another: there, batches over 64 tokens take 16 rows per program
    (T = 1 and 7 keep the GPU's one-row programs covered)."""
    if INTERPRET:
        from eep_hpc.kernels import triton_routing

        config = triton_routing._config
        monkeypatch.setattr(
            triton_routing,
            "_config",
            lambda T, be: (16, 4) if T > 64 else config(T, be),
        )


def distinct_logits(
    T: int, E: int, k: int, dtype: torch.dtype, device=DEVICE
) -> torch.Tensor:
    """randn [T, E] in `dtype`, rows redrawn until their k + 1 largest values are apart (> 1e-4 relative)."""
    x = torch.randn(T, E).to(dtype)
    n = min(k + 1, E)
    for _ in range(1000):
        top = x.float().topk(n, dim=-1).values
        bad = (
            (top[:, :-1] - top[:, 1:]) <= 1e-4 * top[:, :-1].abs().clamp_min(1.0)
        ).any(-1)
        if not bad.any():
            return x.to(device)
        x[bad] = torch.randn(int(bad.sum()), E).to(dtype)
    raise AssertionError("could not draw distinct logits")


def make_tables(E: int, replicas: bool, device=DEVICE):
    """(load [L, E] int64 with random counts, replica_count [L, E] int64, logical_to_physical [L, E, R] int64) laid
    out like ExpertMap's: slots are a random permutation, each expert's replicas -1 padded to R."""
    count = (
        torch.randint(1, 4, (LAYERS, E))
        if replicas
        else torch.ones(LAYERS, E, dtype=torch.long)
    )
    R = int(count.max())
    l2p = torch.full((LAYERS, E, R), -1, dtype=torch.long)
    for layer in range(LAYERS):
        slots = torch.randperm(int(count[layer].sum())).tolist()
        for e in range(E):
            n = int(count[layer, e])
            l2p[layer, e, :n] = torch.tensor(slots[:n])
            slots = slots[n:]
    load = torch.randint(0, 1000, (LAYERS, E))
    return load.to(device), count.to(device), l2p.to(device)


def run_both(logits, top_k, renormalize, replicas):
    load, count, l2p = make_tables(logits.shape[1], replicas, logits.device)
    load_ref = load.clone()
    slots, weights = route_topk(
        logits, top_k, renormalize, load[LAYER], count[LAYER], l2p[LAYER]
    )
    ref_slots, ref_weights = route_topk_reference(
        logits, top_k, renormalize, load_ref[LAYER], count[LAYER], l2p[LAYER]
    )
    return (slots, weights, load), (ref_slots, ref_weights, load_ref)


def assert_matches(out, ref):
    (slots, weights, load), (ref_slots, ref_weights, ref_load) = out, ref
    assert slots.dtype == torch.int64 and weights.dtype == torch.float32
    assert slots.shape == ref_slots.shape and weights.shape == ref_weights.shape
    assert torch.equal(slots, ref_slots)
    assert torch.equal(load, ref_load)  # every layer: only the routed layer's row moved
    assert not weights.isnan().any()
    err = (
        (weights.double() - ref_weights.double()).abs() / ref_weights.double().abs()
    ).nan_to_num(0.0)
    assert (err <= WEIGHT_RTOL).all(), err.max().item()


# ---- CPU: the reference (always run) ----


def test_reference_hand_computed_with_replicas():
    # 4 experts; expert 1 has two replicas (slots 1 and 4), the others one each
    count = torch.tensor([1, 2, 1, 1])
    l2p = torch.tensor([[0, -1], [1, 4], [2, -1], [3, -1]])
    logits = torch.log(
        torch.tensor(
            [
                [0.1, 0.6, 0.2, 0.1],  # top-2: experts 1, 2
                [0.5, 0.3, 0.1, 0.1],  # experts 0, 1
                [0.1, 0.2, 0.3, 0.4],  # experts 3, 2
                [0.2, 0.4, 0.1, 0.3],  # experts 1, 3
            ]
        )
    )
    load = torch.tensor([10, 0, 0, 5])
    slots, weights = route_topk_reference(logits, 2, False, load, count, l2p)
    # expert 1 at (t, j) = (0, 0), (1, 1), (3, 0): replica (t + j) % 2 = 0, 0, 1 -> slots 1, 1, 4
    assert slots.tolist() == [[1, 2], [0, 1], [3, 2], [4, 3]]
    torch.testing.assert_close(
        weights,
        torch.tensor([[0.6, 0.2], [0.5, 0.3], [0.4, 0.3], [0.4, 0.3]]),
        rtol=1e-6,
        atol=0,
    )
    assert load.tolist() == [11, 3, 2, 7]
    load = torch.zeros(4, dtype=torch.long)
    slots, weights = route_topk_reference(logits, 2, True, load, count, l2p)
    torch.testing.assert_close(
        weights,
        torch.tensor([[0.75, 0.25], [0.625, 0.375], [4 / 7, 3 / 7], [4 / 7, 3 / 7]]),
        rtol=1e-6,
        atol=0,
    )
    assert load.tolist() == [1, 3, 2, 2]


def test_reference_empty_batch():
    load = torch.tensor([3, 4])
    slots, weights = route_topk_reference(
        torch.randn(0, 2),
        1,
        True,
        load,
        torch.ones(2, dtype=torch.long),
        torch.tensor([[1], [0]]),
    )
    assert slots.shape == (0, 1) and weights.shape == (0, 1) and load.tolist() == [3, 4]


def test_cpu_tensors_use_the_reference():
    x = distinct_logits(5, 16, 4, torch.float32, "cpu")
    out, ref = run_both(x, 4, True, True)
    assert (
        torch.equal(out[0], ref[0])
        and torch.equal(out[1], ref[1])
        and torch.equal(out[2], ref[2])
    )


# ---- Triton vs reference ----


def triton_route(logits, top_k, renormalize, replicas):
    from eep_hpc.kernels.triton_routing import route_topk_triton

    load, count, l2p = make_tables(logits.shape[1], replicas, logits.device)
    load_ref = load.clone()
    slots, weights = route_topk_triton(
        logits, top_k, renormalize, load[LAYER], count[LAYER], l2p[LAYER]
    )
    ref = route_topk_reference(
        logits, top_k, renormalize, load_ref[LAYER], count[LAYER], l2p[LAYER]
    )
    return (slots, weights, load), (*ref, load_ref)


@needs_kernels
@pytest.mark.parametrize("replicas", [False, True])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("E,top_k", [(8, 1), (8, 2), (8, 8), (60, 1), (60, 2), (60, 8), (128, 1), (128, 2),
                                     (128, 8), (512, 16)])  # fmt: skip
@pytest.mark.parametrize("T", [0, 1, 7, 300])
def test_route_topk_triton(T, E, top_k, dtype, renormalize, replicas):
    x = distinct_logits(T, E, top_k, dtype)
    assert_matches(*triton_route(x, top_k, renormalize, replicas))


def gate_logits(T: int, E: int, D: int = 256) -> torch.Tensor:
    """[T, E] bf16 router logits as a bf16 model's gate Linear makes them (bf16 hidden states and weights): equal
    values among a row's largest are common (about 1 row in 4 at E = 128)."""
    h = torch.randn(T, D).bfloat16()
    w = (torch.randn(E, D) * D**-0.5).bfloat16()
    return torch.nn.functional.linear(h, w).to(DEVICE)


@needs_kernels
@pytest.mark.parametrize("E,top_k,renormalize", [(128, 8, True), (8, 2, True), (64, 6, False)],
                         ids=["qwen3-moe", "mixtral", "deepseek-v2-lite"])  # fmt: skip
@pytest.mark.parametrize("T", [1, 7, 300])
def test_route_topk_triton_bf16_gate(T, E, top_k, renormalize):
    """bf16 gate logits, weights asked for in bf16 (as the model calls it), against the reference.

    Where a row's top k + 1 logits are distinct, experts, slots and load are the reference's exactly. Where logits
    tie, torch.topk (the reference) leaves their order open (on the CPU it does not always put the lower expert
    first), and the kernel takes the lower expert: then the picks' logits still equal the reference's place by
    place, the kernel's experts are the first k of a stable descending sort, the slots follow the reference's
    replica rule and the load counts those picks. Weights: within one bf16 ulp of the reference's (each rounds its
    fp32 weight once; the two fp32 weights differ in their last bits at most)."""
    from eep_hpc.kernels.triton_routing import route_topk_triton

    torch.manual_seed(T * 131 + E)
    logits = gate_logits(T, E)
    load, count, l2p = make_tables(E, True)
    load_before, load_ref = load.clone(), load.clone()
    tables = (count[LAYER], l2p[LAYER])
    slots, weights = route_topk_triton(logits, top_k, renormalize, load[LAYER], *tables, weights_dtype=torch.bfloat16)
    ref_slots, ref_weights = route_topk_reference(
        logits, top_k, renormalize, load_ref[LAYER], *tables, weights_dtype=torch.bfloat16
    )
    assert slots.dtype == torch.int64 and weights.dtype == ref_weights.dtype == torch.bfloat16
    assert slots.shape == weights.shape == ref_slots.shape == (T, top_k)

    table = l2p[LAYER]
    owner = torch.full((int(count[LAYER].sum()),), -1, dtype=torch.long, device=DEVICE)
    owner[table[table >= 0]] = torch.arange(E, device=DEVICE)[:, None].expand_as(table)[table >= 0]
    ids, ref_ids = owner[slots], owner[ref_slots]
    assert (ids >= 0).all() and (ref_ids >= 0).all()
    # the same logits picked, place by place; ties to the lower expert
    assert torch.equal(logits.gather(1, ids), logits.gather(1, ref_ids))
    stable = torch.sort(logits.float(), dim=-1, descending=True, stable=True).indices[:, :top_k]
    assert torch.equal(ids, stable)
    top = logits.float().topk(min(top_k + 1, E), dim=-1).values
    distinct = (top[:, :-1] != top[:, 1:]).all(-1)
    assert torch.equal(ids[distinct], ref_ids[distinct]) and torch.equal(slots[distinct], ref_slots[distinct])
    # slots: token t's j-th expert e takes replica (t + j) % count[e]
    pick = (torch.arange(T, device=DEVICE)[:, None] + torch.arange(top_k, device=DEVICE)) % count[LAYER][ids]
    assert torch.equal(slots, table[ids, pick])
    # load: the picks counted once each, only in the routed layer's row
    expected_load = load_before.clone()
    expected_load[LAYER] += torch.bincount(ids.flatten(), minlength=E)
    assert torch.equal(load, expected_load)
    if torch.equal(ids.sort(1).values, ref_ids.sort(1).values):
        assert torch.equal(load, load_ref)
    # weights: one bf16 ulp (2**-7 relative) at most
    w, ref_w = weights.float(), ref_weights.float()
    assert not w.isnan().any() and ((w - ref_w).abs() <= 2**-7 * ref_w.abs()).all(), (w - ref_w).abs().max()


@needs_kernels
@pytest.mark.parametrize("block_t,num_warps", [(4, 1), (16, 4)])
@pytest.mark.parametrize("T,E,top_k", [(7, 60, 2), (37, 128, 8)])
def test_route_topk_triton_rows_per_program(
    monkeypatch, T, E, top_k, block_t, num_warps
):
    """Several rows per program (the large-batch config), with padding rows in the last program."""
    from eep_hpc.kernels import triton_routing

    monkeypatch.setattr(
        triton_routing, "_config", lambda T, block_e: (block_t, num_warps)
    )
    x = distinct_logits(T, E, top_k, torch.float32)
    assert_matches(*triton_route(x, top_k, True, True))


@needs_kernels
def test_route_topk_triton_strided_inputs():
    """Logits and tables as non-contiguous views: a column slice of a wider tensor, a transposed tensor."""
    from eep_hpc.kernels.triton_routing import route_topk_triton

    T, E, k = 37, 60, 4
    wide = torch.randn(T, E + 8, device=DEVICE)
    wide[:, 3 : 3 + E] = distinct_logits(T, E, k, torch.float32)
    # strides (1, T)
    transposed = distinct_logits(T, E, k, torch.float32).t().contiguous().t()
    for logits in (wide[:, 3 : 3 + E], transposed):
        _, count, l2p = make_tables(E, True)
        load_wide = torch.zeros(E, 2, dtype=torch.long, device=DEVICE)
        R = l2p.shape[2]
        l2p_view = torch.cat([l2p[LAYER], l2p[LAYER]], 1)[:, :R]  # row stride 2R
        out = route_topk_triton(
            logits, k, True, load_wide[:, 1], count[LAYER], l2p_view
        )
        ref_load = torch.zeros(E, dtype=torch.long, device=DEVICE)
        ref = route_topk_reference(logits, k, True, ref_load, count[LAYER], l2p[LAYER])
        assert_matches((*out, load_wide[:, 1]), (*ref, ref_load))
        assert not load_wide[:, 0].any()


@needs_kernels
def test_route_topk_triton_ties_go_to_the_lower_expert():
    from eep_hpc.kernels.triton_routing import route_topk_triton

    E, k = 16, 4
    x = torch.zeros(3, E, device=DEVICE)
    x[1, [3, 9, 12]] = 1.0  # three tied maxima, then 13 tied zeros
    x[2] = float("-inf")
    # two finite logits, the rest -inf: picks 5, 7, then the lowest -inf experts
    x[2, [5, 7]] = 2.0
    count = torch.ones(E, dtype=torch.long, device=DEVICE)
    l2p = torch.arange(E, device=DEVICE)[:, None] + 100
    load = torch.zeros(E, dtype=torch.long, device=DEVICE)
    slots, weights = route_topk_triton(x, k, False, load, count, l2p)
    assert (slots - 100).tolist() == [[0, 1, 2, 3], [3, 9, 12, 0], [5, 7, 0, 1]]
    torch.testing.assert_close(
        weights[0], torch.full((k,), 1 / E, device=DEVICE), rtol=1e-6, atol=0
    )
    torch.testing.assert_close(
        weights[2], torch.tensor([0.5, 0.5, 0, 0], device=DEVICE), rtol=1e-6, atol=0
    )
    assert load.tolist() == [3, 2, 1, 2, 0, 1, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0]


@needs_cuda
@pytest.mark.parametrize("T,E,top_k", [(8192, 128, 8), (1000, 512, 16)])
def test_route_topk_triton_large(T, E, top_k):
    x = distinct_logits(T, E, top_k, torch.bfloat16)
    assert_matches(*triton_route(x, top_k, True, True))


@needs_cuda
@pytest.mark.parametrize("T", [4, 1024])  # one row per program; 16 rows per program
def test_route_topk_dispatches_to_triton_and_captures_in_a_graph(monkeypatch, T):
    """route_topk on CUDA runs the kernel; one captured launch replayed on fresh logits matches the reference
    each time (no host sync inside, load counts accumulate across replays)."""
    from eep_hpc.kernels import triton_routing

    calls = []
    kernel = triton_routing.route_topk_triton
    monkeypatch.setattr(
        triton_routing, "route_topk_triton", lambda *a, **kw: calls.append(1) or kernel(*a, **kw)
    )
    E, k = 128, 8
    x = distinct_logits(T, E, k, torch.bfloat16)
    assert_matches(*run_both(x, k, True, True))
    assert calls == [1]
    load, count, l2p = make_tables(E, True)
    static_x = x.clone()
    args = (k, True, load[LAYER], count[LAYER], l2p[LAYER])
    kernel(static_x, *args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        slots, weights = kernel(static_x, *args)
    for _ in range(3):
        static_x.copy_(distinct_logits(T, E, k, torch.bfloat16))
        ref_load = load.clone()
        graph.replay()
        ref = route_topk_reference(
            static_x, k, True, ref_load[LAYER], count[LAYER], l2p[LAYER]
        )
        assert_matches((slots, weights, load), (*ref, ref_load))


def test_weights_come_back_in_the_asked_dtype():
    """The model asks for its activation dtype: the fp32 weights, rounded once (no separate cast kernel)."""
    logits = torch.randn(5, 8)
    tables = (torch.zeros(8, dtype=torch.int64), torch.ones(8, dtype=torch.int64), torch.arange(8).unsqueeze(1))
    _, fp32 = route_topk_reference(logits, 2, True, *tables)
    _, bf16 = route_topk(logits, 2, True, *tables, weights_dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and torch.equal(bf16, fp32.to(torch.bfloat16))
