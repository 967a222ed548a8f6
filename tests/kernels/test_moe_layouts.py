"""The MoE pieces the sync-free multi-rank step needs: padding rows of a graph's batch are never routed nor counted
(router, reference and Triton), the fixed-size all-to-all returns what the experts computed, and the batched
expert layout (nixl_ep's dispatch output) gives the same rows as the packed one."""

from __future__ import annotations

import pytest
import torch

from eep_hpc.kernels.moe import swiglu_experts_batched_reference, swiglu_experts_reference
from eep_hpc.kernels.routing import route_topk_reference
from kernel_checks import DEVICE, needs_kernels, rel_err


def _tables(E: int, replicas: int = 1):
    count = torch.full((E,), replicas, dtype=torch.long)
    l2p = torch.arange(E * replicas).view(replicas, E).t().contiguous()  # expert e in slots e, E + e, ...
    return count, l2p


def test_reference_router_skips_padding_rows():
    torch.manual_seed(0)
    T, E, k, valid = 7, 8, 2, 3
    logits = torch.randn(T, E)
    count, l2p = _tables(E)
    load_all, load_valid = torch.zeros(E, dtype=torch.long), torch.zeros(E, dtype=torch.long)
    slots_all, w_all = route_topk_reference(logits, k, True, load_all, count, l2p)
    slots, w = route_topk_reference(logits, k, True, load_valid, count, l2p, num_valid=torch.tensor([valid]))
    assert torch.equal(slots[:valid], slots_all[:valid]) and torch.equal(w[:valid], w_all[:valid])
    assert (slots[valid:] == -1).all() and (w[valid:] == 0).all()
    want = torch.bincount(slots_all[:valid].reshape(-1), minlength=E)  # one replica: slot e is expert e
    assert torch.equal(load_valid, want) and load_valid.sum() == valid * k


@needs_kernels
@pytest.mark.parametrize("valid", [0, 1, 5, 9])
def test_triton_router_skips_padding_rows(valid):
    from eep_hpc.kernels.triton_routing import route_topk_triton

    torch.manual_seed(1)
    T, E, k = 9, 16, 4
    logits = torch.randn(T, E, device=DEVICE)
    count, l2p = (t.to(DEVICE) for t in _tables(E, replicas=2))
    n = torch.tensor([valid], device=DEVICE)
    ref_load, got_load = (torch.zeros(E, dtype=torch.long, device=DEVICE) for _ in range(2))
    want = route_topk_reference(logits, k, True, ref_load, count, l2p, num_valid=n)
    got = route_topk_triton(logits, k, True, got_load, count, l2p, num_valid=n)
    assert torch.equal(got[0], want[0])
    assert rel_err(got[1], want[1]) < 1e-5
    assert torch.equal(got_load, ref_load) and int(got_load.sum()) == valid * k


def test_reference_experts_give_zero_rows_for_padding():
    torch.manual_seed(2)
    S, D, I = 3, 8, 6
    w13, w2 = torch.randn(S, 2 * I, D), torch.randn(S, D, I)
    x = torch.randn(5, D)
    slot = torch.tensor([2, -1, 0, -1, 1])
    out = swiglu_experts_reference(x, slot, w13, w2)
    assert (out[[1, 3]] == 0).all()
    kept = torch.tensor([0, 2, 4])
    assert torch.equal(out[kept], swiglu_experts_reference(x[kept], slot[kept], w13, w2))


def _batched_case(E: int, N: int, D: int, I: int, S: int, dtype=torch.float32):
    torch.manual_seed(3)
    x = torch.randn(E, N, D, dtype=dtype, device=DEVICE)
    counts = torch.tensor([min(N, (3 * e + 1) % (N + 1)) for e in range(E)], dtype=torch.int32, device=DEVICE)
    w13 = (torch.randn(S, 2 * I, D, device=DEVICE) / D**0.5).to(dtype)
    w2 = (torch.randn(S, D, I, device=DEVICE) / I**0.5).to(dtype)
    return x, counts, w13, w2


def _packed_reference(x, counts, w13, w2):
    """The same rows through the packed (row, slot) reference, placed back in the batched layout."""
    E, N, D = x.shape
    out = torch.zeros_like(x)
    for e, n in enumerate(counts.tolist()[: w13.shape[0]]):
        rows = x[e, :n].cpu()
        out[e, :n] = swiglu_experts_reference(rows, torch.full((n,), e), w13.cpu(), w2.cpu()).to(out.device)
    return out


def test_batched_reference_matches_packed():
    x, counts, w13, w2 = (t.cpu() for t in _batched_case(E=4, N=6, D=8, I=4, S=3))  # E > S: slot 3 is not held
    counts[3] = 0
    got = swiglu_experts_batched_reference(x, counts, w13, w2)
    assert torch.equal(got, _packed_reference(x, counts, w13, w2))
    assert (got[counts.long()[:, None] <= torch.arange(6)[None, :]] == 0).all()


@needs_kernels
@pytest.mark.parametrize("E,N,S", [(4, 16, 4), (5, 24, 3), (2, 70, 2)])
def test_triton_batched_experts_match_reference(E, N, S):
    from eep_hpc.kernels.triton_moe import swiglu_experts_batched_triton

    x, counts, w13, w2 = _batched_case(E, N, D=32, I=32, S=S)
    counts[S:] = 0  # nixl_ep routes nothing to seats' experts this rank does not hold
    got = swiglu_experts_batched_triton(x, counts, w13, w2)
    want = _packed_reference(x, counts, w13, w2)
    # the grids bounded by the rows that can arrive (nixl_ep: seats x agreed tokens x top-k), down to exactly the
    # rows that came: the same outputs
    bounded = swiglu_experts_batched_triton(x, counts, w13, w2, max_rows=int(counts.sum()))
    for e, n in enumerate(counts.tolist()):
        assert rel_err(got[e, :n], want[e, :n]) < 1e-5, e
        assert torch.equal(bounded[e, :n], got[e, :n]), e


def test_batched_row_blocks_bounded_by_the_rows_that_can_arrive():
    """Blocks that hold rows come first; a bound on the rows keeps all of them and drops only empty ones."""
    from eep_hpc.kernels.triton_moe import batched_rows

    counts = torch.tensor([5, 0, 17, 1, 0, 32], dtype=torch.int32)
    full = batched_rows(counts, 64, 16, 6 * 64)
    bounded = batched_rows(counts, 64, 16, 6 * 64, max_rows=int(counts.sum()))
    assert full[0].numel() == 6 * 4 * 16 and bounded[0].numel() == (-(-55 // 16) + 6) * 16
    n = bounded[1].numel()
    assert torch.equal(bounded[0], full[0][: n * 16]) and torch.equal(bounded[1], full[1][:n])
    assert torch.equal(bounded[2], full[2]) and int(full[2]) == (1 + 2 + 1 + 2) * 16  # the blocks holding rows
    assert int(bounded[2]) <= n * 16
