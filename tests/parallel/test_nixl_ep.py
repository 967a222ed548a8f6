"""The nixl_ep all-to-all backend: config errors and the epoch logic on CPU (a stand-in for nixl_ep that keeps its
rules: symmetric handshakes, masks, the recv layout), then the real nixl_ep on two GPUs against NCCL, through a
disconnect/reconnect, and serving with grow/shrink: greedy token ids against a one-rank reference (compare_greedy,
whose rules are checked on the CPU)."""

from __future__ import annotations

import datetime
import importlib.util
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from eep_hpc import protocol as P
from eep_hpc.config import Config, ConfigError, load_config
from eep_hpc.kernels.moe import swiglu_experts_reference
from eep_hpc.model.moe import ExpertParallel
from eep_hpc.parallel import nixl_ep_all_to_all as nx
from eep_hpc.parallel.all_to_all import TorchAllToAll
from eep_hpc.parallel.backends import make_all_to_all
from eep_hpc.parallel.expert_map import ExpertMap
from eep_hpc.parallel.groups import EpochGroup, connect_store

NUM_EXPERTS, TOP_K = 16, 8
# 18 slots (experts 0 and 1 twice), uneven over two ranks: rank 0 holds 7, rank 1 holds 11
P2L = [list(range(NUM_EXPERTS)) + [0, 1]]


def expert_weights(D: int, I: int, dtype, device):
    """[E, 2I, D], [E, D, I]: the same on every rank (replicas of an expert must agree)."""
    g = torch.Generator().manual_seed(7)
    w13 = torch.randn(NUM_EXPERTS, 2 * I, D, generator=g) / D**0.5
    w2 = torch.randn(NUM_EXPERTS, D, I, generator=g) / I**0.5
    return w13.to(device, dtype), w2.to(device, dtype)


def routed_inputs(T: int, D: int, seed: int, dtype, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(device, dtype)
    w, ids = torch.randn(T, NUM_EXPERTS, generator=g).softmax(-1).topk(TOP_K, dim=-1)
    return x, ids.to(device), (w / w.sum(-1, keepdim=True)).to(device, dtype)


def dense_reference(x, ids, w, w13, w2):
    """fp32: sum over k of w * expert(x), every expert at hand."""
    T, k = ids.shape
    rows = x.float()[:, None, :].expand(T, k, x.shape[1]).reshape(T * k, -1)
    y = swiglu_experts_reference(rows, ids.reshape(-1), w13.float(), w2.float()).view(T, k, -1)
    return (y * w.float()[:, :, None]).sum(1)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-6))


def epoch_msg(epoch: int, rank_ids: list[int], port: int, offsets: list[int]) -> P.Epoch:
    p2l = P2L if offsets[-1] == len(P2L[0]) else [list(range(offsets[-1]))]
    return P.Epoch(epoch=epoch, rank_ids=rank_ids, store_host="127.0.0.1", store_port=port, physical_to_logical=p2l,
                   slot_offsets=offsets)


# ---- CPU: configuration ---------------------------------------------------------------------------------------


def test_nixl_ep_on_cpu_is_a_config_error():
    with pytest.raises(ConfigError, match="nixl_ep.*CUDA"):
        load_config(None, parallel={"backend": "nixl_ep", "device": "cpu"})
    cfg = load_config(None, parallel={"backend": "nixl_ep"})  # device "auto" that lands on a CPU
    group = EpochGroup(None, 1, 0, 1, torch.device("cpu"))
    emap = ExpertMap(P2L, [0, 18], 0, NUM_EXPERTS)
    arch = SimpleNamespace(hidden_size=2048, torch_dtype=torch.bfloat16)
    with pytest.raises(ConfigError, match="nixl_ep.*CUDA"):
        make_all_to_all(cfg, arch, epoch_msg(1, [0], 1, [0, 18]), group, emap)
    with pytest.raises(ConfigError, match="hidden size 64"):
        nx.check_backend(cfg, 64, torch.bfloat16, torch.device("cuda"))
    cfg.model.dtype = "float32"
    with pytest.raises(ConfigError, match="bfloat16"):
        nx.check_backend(cfg, 2048, torch.bfloat16, torch.device("cuda"))
    assert isinstance(make_all_to_all(Config(), arch, None, group, emap), TorchAllToAll)


def test_geometry_only_grows_and_seats_round_to_nvl_peers():
    cfg = Config()
    cfg.parallel.moe_chunk_tokens, cfg.engine.cuda_graphs = 30, False  # tokens per dispatch: rounded up to 4
    g = nx.required_geometry(cfg, 2048, [0, 1], [0, 7, 18], None)
    assert g == nx.Geometry(seats=2, experts_per_seat=11, max_tokens=32, hidden=2048)
    assert nx.required_geometry(cfg, 2048, [0, 1, 2], [0, 6, 12, 18], g) == nx.Geometry(3, 11, 32, 2048)
    assert nx.required_geometry(cfg, 2048, [0, 9], [0, 9, 18], g).seats == 16  # 10 seats: 8 < n -> multiple of 8
    assert nx.Geometry.decode(g.encode()) == g


def test_slot_table():
    table = nx.slot_to_nixl_expert([0, 2, 5], seats=[3, 0], experts_per_seat=4)
    assert table.tolist() == [12, 13, 0, 1, 2]


# ---- CPU: the epoch logic against a stand-in for nixl_ep ------------------------------------------------------


class Fabric:
    """What the stand-in buffers share across threads: who is connected to whom, and each collective call."""

    def __init__(self):
        self.cv = threading.Condition()
        self.links: set[tuple[object, int]] = set()  # (buffer, seat): that buffer is connected to seat
        self.posts: dict = {}
        self.calls: dict = {}

    def exchange(self, kind: str, seat: int, members: list[int], value):
        key = (kind, tuple(members))
        with self.cv:
            n = self.calls[(key, seat)] = self.calls.get((key, seat), 0) + 1
            box = self.posts.setdefault((key, n), {})
            box[seat] = value
            self.cv.notify_all()
            assert self.cv.wait_for(lambda: len(box) == len(members), timeout=30), f"{kind}: peers never came"
            return dict(box)


class FakeBuffer:
    """nixl_ep.Buffer's low-latency subset, with its rules: seats < num_ranks; connect skips connected peers and
    both sides must make it; disconnect only connected peers; recv layout [E, R*Tmax, D], rows packed per expert."""

    fabric: Fabric

    def __init__(self, rank, explicitly_destroy, timeout_ms):
        self.seat, self.store, self.masked = rank, None, set()

    @staticmethod
    def get_low_latency_buffer_size_hint(T, D, R, E):
        return T * D * E * 8

    def update_memory_buffers(self, num_ranks, num_experts_per_rank, num_rdma_bytes):
        assert 0 <= self.seat < num_ranks and (num_ranks < 8 or num_ranks % 8 == 0)
        self.R, self.E = num_ranks, num_experts_per_rank

    def peers(self) -> set[int]:
        return {s for b, s in self.fabric.links if b is self}

    def set_tcp_store_group(self, store):
        self.store = store

    def connect_ranks(self, seats):
        assert self.store is not None and seats and all(0 <= s < self.R for s in seats)
        for s in sorted(seats):  # a handshake both sides make (one global order: no deadlock)
            if s != self.seat and s not in self.peers():
                self.fabric.exchange("connect", self.seat, sorted([self.seat, s]), None)
                self.fabric.links.add((self, s))
            self.masked.discard(s)

    def disconnect_ranks(self, seats):
        for s in seats:
            assert s in self.peers(), f"seat {self.seat} was not connected to {s}"
            self.fabric.links.discard((self, s))

    def clean_mask_buffer(self):
        self.masked = set()

    def update_mask_buffer(self, seat, mask):
        (self.masked.add if mask else self.masked.discard)(seat)

    def query_mask_buffer(self, out):
        active = (self.peers() - self.masked) | {self.seat}
        out.copy_(torch.tensor([int(s not in active) for s in range(self.R)], dtype=torch.int32))

    def destroy(self):
        self.fabric.links = {(b, s) for b, s in self.fabric.links if b is not self}

    def members(self) -> list[int]:
        return sorted((self.peers() - self.masked) | {self.seat})

    def low_latency_dispatch(self, x, topk, T_max, num_experts, use_fp8):
        assert not use_fp8 and x.dtype == torch.bfloat16 and x.is_contiguous() and topk.is_contiguous()
        assert topk.dtype == torch.int64 and x.shape[0] == topk.shape[0] <= T_max
        assert num_experts % self.E == 0 and max(self.members()) < num_experts // self.E <= self.R
        R = num_experts // self.E
        assert R * T_max % 4 == 0
        posts = self.fabric.exchange("dispatch", self.seat, self.members(), (x, topk))
        recv = torch.zeros(self.E, R * T_max, x.shape[1], dtype=x.dtype)
        count = torch.zeros(self.E, dtype=torch.int32)
        src = [[] for _ in range(self.E)]
        for s in sorted(posts):
            xs, ts = posts[s]
            for t in range(xs.shape[0]):
                for j in range(ts.shape[1]):
                    e = int(ts[t, j])
                    if e >= 0 and e // self.E == self.seat:
                        recv[e % self.E, count[e % self.E]] = xs[t]
                        src[e % self.E].append((s, t, j))
                        count[e % self.E] += 1
        return recv, count, (src, R), None, None

    def low_latency_combine(self, layout, topk, w, handle):
        src, R = handle
        assert layout.is_contiguous() and layout.shape[:2] == (self.E, R * (layout.shape[1] // R))
        assert w.dtype == torch.float32 and w.is_contiguous() and w.shape == topk.shape
        posts = self.fabric.exchange("combine", self.seat, self.members(), (layout, src))
        T, k = topk.shape
        parts = torch.zeros(T, k, layout.shape[2])
        for s in sorted(posts):
            lay, their_src = posts[s]
            for e, lst in enumerate(their_src):
                for pos, (seat, t, j) in enumerate(lst):
                    if seat == self.seat:
                        parts[t, j] = lay[e, pos].float()
        out = (parts * w[:, :, None]).sum(1)  # fp32, like nixl_ep
        return out.to(torch.bfloat16), None, None


def cpu_rank(cfg, port, rank_id, fabric):
    nixl = SimpleNamespace(Buffer=type("Buffer", (FakeBuffer,), {"fabric": fabric}), topk_idx_t=torch.int64)
    return nx.NixlEpRuntime(cfg, connect_store("127.0.0.1", port, 30), rank_id, nixl, torch.device("cpu"))


def run_cpu_epoch(runtimes, epoch: int, rank_ids: list[int], offsets: list[int], port: int, D=2048, I=32):
    """Every member enters `epoch` (threads); each checks NixlEpAllToAll against the torch backend over gloo."""
    w13_all, w2_all = expert_weights(D, I, torch.bfloat16, "cpu")
    msg = epoch_msg(epoch, rank_ids, port, offsets)

    def member(me: int):
        rt = runtimes[rank_ids[me]]
        group = EpochGroup(rt.store, epoch, me, len(rank_ids), torch.device("cpu"), timeout_s=30)
        emap = ExpertMap(msg.physical_to_logical, offsets, me, NUM_EXPERTS)
        seats = rt.enter(epoch, me, group, offsets, D)
        a2a = nx.NixlEpAllToAll(rt, rank_ids, me, seats, emap, group)
        local = emap.local_logical(0)
        w13, w2 = w13_all[local], w2_all[local]
        errs = []
        for T in (0, 1, 5):
            x, ids, w = routed_inputs(T, D, 100 * epoch + 10 * me + T, torch.bfloat16, "cpu")
            ours = ExpertParallel(emap, a2a, NUM_EXPERTS).forward(0, x, ids, w, w13, w2)
            ref = ExpertParallel(emap, TorchAllToAll(group), NUM_EXPERTS).forward(0, x, ids, w, w13, w2)
            assert ours.shape == (T, D)
            errs.append(rel(ours, ref) if T else 0.0)
        failed = a2a.failed_ranks()
        group.destroy()
        return seats, errs, failed, a2a

    with ThreadPoolExecutor(len(rank_ids)) as pool:
        return list(pool.map(member, range(len(rank_ids))))


def test_epochs_connect_disconnect_reconnect_and_reuse_seats_cpu():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=30))
    port, fabric = master.port, Fabric()
    cfg = Config()
    cfg.parallel.moe_chunk_tokens, cfg.engine.cuda_graphs = 8, False
    cfg.control.rank_timeout_s = 30
    cfg.parallel.nixl_ep_max_ranks = 3
    rts = {rid: cpu_rank(cfg, port, rid, fabric) for rid in range(4)}

    def check(out, seats):
        for s, errs, failed, _ in out:
            assert s == seats and failed == [] and max(errs) < 2e-2, (s, errs, failed)

    def peers(rid):
        return rts[rid].buffer.peers()

    check(run_cpu_epoch(rts, 1, [0, 1], [0, 7, 18], port), [0, 1])
    assert peers(0) == {1} and peers(1) == {0} and rts[0].geometry == nx.Geometry(3, 11, 8, 2048)
    run_cpu_epoch(rts, 2, [0], [0, 18], port)  # rank 1 left (and still thinks it is connected to 0)
    assert peers(0) == set() and peers(1) == {0} and master.get("nixl_ep/seat/1") == b"free"
    two = run_cpu_epoch(rts, 3, [0, 1], [0, 7, 18], port)  # 1 takes its seat back; both reconnect
    check(two, [0, 1])
    assert peers(0) == {1} and peers(1) == {0} and rts[0].incarnation == rts[1].incarnation == 1  # no rebuild
    three = run_cpu_epoch(rts, 4, [0, 1, 2], [0, 6, 12, 18], port)  # grow within 3 seats: no rebuild
    check(three, [0, 1, 2])
    assert {rts[r].incarnation for r in (0, 1, 2)} == {1} and peers(2) == {0, 1}
    # the layout covers every seat, members or not: the members' CUDA graphs could serve the grown epoch
    assert [a[3].graph_key for a in two] == [a[3].graph_key for a in three[:2]] == [("nixl_ep", 1, 33, 8)] * 2
    check(run_cpu_epoch(rts, 5, [2, 1], [0, 9, 18], port), [2, 1])  # 0 leaves; survivors renumbered, seats kept
    assert peers(2) == {1} and peers(1) == {2} and master.get("nixl_ep/seat/0") == b"free"
    check(run_cpu_epoch(rts, 6, [2, 1, 3], [0, 6, 12, 18], port), [2, 1, 0])  # a joiner takes the freed seat
    assert {rts[r].incarnation for r in (1, 2, 3)} == {1} and peers(3) == {1, 2}
    # more slots on one rank than the buffer holds: everyone rebuilds, then connects afresh
    check(run_cpu_epoch(rts, 7, [2, 1], [0, 14, 18], port), [2, 1])
    assert rts[1].incarnation == rts[2].incarnation == 2 and rts[1].geometry.experts_per_seat == 14
    assert peers(2) == {1} and peers(1) == {2}
    # a peer masked (declared dead, or timed out): reported; the next epoch of the same members unmasks it
    out = run_cpu_epoch(rts, 8, [2, 1], [0, 9, 18], port)
    a2a = out[0][3]
    a2a.mask_ranks([1])
    assert a2a.failed_ranks() == [1]
    check(run_cpu_epoch(rts, 9, [2, 1], [0, 9, 18], port), [2, 1])


# ---- two GPUs: the real nixl_ep -------------------------------------------------------------------------------

two_gpus_with_nixl_ep = pytest.mark.skipif(
    torch.cuda.device_count() < 2 or importlib.util.find_spec("nixl_ep") is None,
    reason="needs two CUDA GPUs and nixl_ep")


def _gpu_worker(i: int, port: int) -> None:
    torch.cuda.set_device(i)
    dev, D, I = torch.device("cuda", i), 2048, 256
    store = connect_store("127.0.0.1", port, 120)
    cfg = Config()
    cfg.parallel.backend, cfg.parallel.ranks, cfg.model.dtype = "nixl_ep", 2, "bfloat16"
    cfg.parallel.moe_chunk_tokens, cfg.engine.cuda_graphs = 128, False
    arch = SimpleNamespace(hidden_size=D, torch_dtype=torch.bfloat16)
    w13_all, w2_all = expert_weights(D, I, torch.bfloat16, dev)

    def run(epoch: int, rank_ids: list[int], offsets: list[int]):
        me = rank_ids.index(i)
        msg = epoch_msg(epoch, rank_ids, port, offsets)
        group = EpochGroup(store, epoch, me, len(rank_ids), dev, timeout_s=120)
        emap = ExpertMap(msg.physical_to_logical, offsets, me, NUM_EXPERTS, dev)
        a2a = make_all_to_all(cfg, arch, msg, group, emap)
        local = emap.local_logical(0)
        for T in (0, 1, 37, 128):
            x, ids, w = routed_inputs(T, D, 1000 * epoch + 10 * i + T, torch.bfloat16, dev)
            ours = ExpertParallel(emap, a2a, NUM_EXPERTS).forward(0, x, ids, w, w13_all[local], w2_all[local])
            nccl = ExpertParallel(emap, TorchAllToAll(group), NUM_EXPERTS).forward(0, x, ids, w, w13_all[local],
                                                                                     w2_all[local])
            assert ours.shape == (T, D) and ours.dtype == torch.bfloat16
            if T:
                ref = dense_reference(x, ids, w, w13_all, w2_all)
                assert rel(ours, ref) < 3e-2 and rel(nccl, ref) < 3e-2 and rel(ours, nccl) < 3e-2, \
                    (epoch, T, rel(ours, ref), rel(nccl, ref), rel(ours, nccl))
        assert a2a.failed_ranks() == []
        return a2a, group

    a2a, group = run(1, [0, 1], [0, 7, 18])
    group.destroy()
    if i == 0:  # rank 1 leaves: rank 0 serves alone and disconnects it
        _, group = run(2, [0], [0, 18])
        store.set("test/epoch2", "done")
    else:
        store.wait(["test/epoch2"], datetime.timedelta(seconds=120))
    a2a, group = run(3, [0, 1], [0, 7, 18])  # connect_ranks again, same buffers
    assert nx._runtime.incarnation == 1, "the buffer was rebuilt"
    group.destroy()
    a2a, group = run(4, [0, 1], [0, 9, 18])
    if i == 0:  # declared dead: masked at once, reported as failed
        a2a.mask_ranks([1])
        assert a2a.failed_ranks() == [1]
    group.all_reduce_max([0])
    group.destroy()
    a2a, group = run(5, [0, 1], [0, 7, 18])  # the next epoch of the same members unmasks it
    group.all_reduce_max([0])
    group.destroy()
    nx._runtime.close()


@pytest.mark.gpu
@two_gpus_with_nixl_ep
def test_nixl_ep_matches_nccl_across_disconnect_and_reconnect():
    import torch.multiprocessing as mp

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=120))
    mp.spawn(_gpu_worker, args=(master.port,), nprocs=2, join=True)


# ---- serving: greedy token ids against a one-rank reference, up to near-ties ---------------------------------------

# A bf16 model in another summation order (tokens dispatched to two ranks and combined back, other batch shapes)
# moves a logprob by a few bf16 units: the served 2-layer model's logits (|logit| ~ 1-4) are spaced 2^-7..2^-6
# nats. Measured on the CPU with the same model: two ranks (torch backend) against one moved the chosen token's
# logprob by 0.0006 nats on average, 0.016 at most (16/16 prompts identical); a batch of 16 against one prompt at a
# time by 0.003 on average, 0.017 at most. So where the reference's best two tokens are within NEAR_TIE of each
# other (about a quarter of the positions of this model, a few percent of them exact bf16 ties), another order may
# pick the other one, and the rest of that text then differs for good reason. Everywhere else the choice must be
# the same. What it catches, measured the same way (the torch backend's combine broken on purpose): one token's
# expert outputs landing on another's, or every remote expert output scaled by 0.5, fail; scaled by 0.9 passes
# (the dummy model's experts move its residual stream by ~10 %, so that is within bf16 noise of the logits).
NEAR_TIE = 0.1  # nats
MEAN_DEVIATION = 0.03  # nats: the mean |logprob - reference's| of the same token after the same prefix


def compare_greedy(got: list, ref: list, near_tie: float = NEAR_TIE, mean_deviation: float = MEAN_DEVIATION) -> dict:
    """Greedy token ids (test_gpu.Completion, requested with logprobs >= 2) against a reference run of the same
    prompts, exactly, token by token up to the first difference. A difference is allowed only where it is a near-tie
    of both runs: the reference's best two tokens within `near_tie` nats, the other run picked the reference's
    runner-up, and it ranked the reference's choice within `near_tie` of its own. Where the tokens agree (same
    prefix), their logprobs differ by at most `near_tie` and on average by at most `mean_deviation`; and at least
    three quarters of all tokens are compared. Fails naming each violation; returns the figures."""
    problems, deviations, identical, total = [], [], 0, 0
    for k, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert len(g.ids) == len(r.ids), (k, g.ids, r.ids)
        total += len(r.ids)
        for j, (a, b) in enumerate(zip(g.ids, r.ids)):
            if a == b:
                deviations.append(abs(g.logprobs[j] - r.logprobs[j]))
                continue
            ref_gap = r.logprobs[j] - r.top[j].get(a, float("-inf"))
            own_gap = g.logprobs[j] - g.top[j].get(b, float("-inf"))
            if not (ref_gap < near_tie and own_gap < near_tie):
                problems.append(f"prompt {k}, token {j}: {a} instead of {b}; the reference preferred {b} by "
                                f"{ref_gap:.4f} nats (its top: {r.top[j]}), this run {a} by {own_gap:.4f} "
                                f"(its top: {g.top[j]}); a near-tie is < {near_tie}")
            break
        else:
            identical += 1
    compared = len(deviations)
    figures = {"prompts_identical": f"{identical}/{len(ref)}", "tokens_compared": f"{compared}/{total}",
               "max_deviation": max(deviations, default=0.0),
               "mean_deviation": sum(deviations) / max(compared, 1)}
    if figures["max_deviation"] > near_tie or figures["mean_deviation"] > mean_deviation:
        problems.append(f"logprobs of the same tokens after the same prefix differ by up to "
                        f"{figures['max_deviation']:.4f} nats (mean {figures['mean_deviation']:.4f}; allowed "
                        f"{near_tie}, mean {mean_deviation})")
    if compared < 0.75 * total:
        problems.append(f"only {compared} of {total} tokens compared before the texts parted")
    assert not problems, "\n".join(problems)
    return figures


def _completion(ids, logprobs, runner_up_gap=1.0):
    """A test_gpu.Completion whose every position lists the chosen token and a runner-up `runner_up_gap` below."""
    from support import Completion

    top = [{t: lp, (t + 1) % 512: lp - runner_up_gap} for t, lp in zip(ids, logprobs)]
    return Completion(list(ids), list(logprobs), top, [])


def test_compare_greedy_allows_only_near_tie_differences():
    ref = [_completion([5, 6, 7, 8], [-1.0] * 4), _completion([9, 10, 11, 12], [-2.0] * 4)]
    same = [_completion([5, 6, 7, 8], [-1.01] * 4), _completion([9, 10, 11, 12], [-1.99] * 4)]
    assert compare_greedy(same, ref)["prompts_identical"] == "2/2"
    # token 3 of prompt 0: the reference's runner-up (7 + 1) was 0.05 below, and this run ranks them the other way
    ref[0].top[3] = {8: -1.0, 9: -1.05}
    flip = [_completion([5, 6, 7, 9], [-1.0] * 4), _completion([9, 10, 11, 12], [-2.0] * 4)]
    flip[0].top[3] = {9: -1.0, 8: -1.04}
    assert compare_greedy(flip, ref)["tokens_compared"] == "7/8"
    with pytest.raises(AssertionError, match="token 3: 9 instead of 8"):
        compare_greedy(flip, ref, near_tie=0.03)  # not a near-tie by this standard
    clear = [_completion([5, 6, 7, 8], [-1.0] * 4), _completion([9, 10, 13, 12], [-2.0] * 4)]
    with pytest.raises(AssertionError, match=r"prompt 1, token 2: 13 instead of 11; the reference preferred 11 by inf"):
        compare_greedy(clear, ref)  # 13 is not even among the reference's best
    with pytest.raises(AssertionError, match="differ by up to 0.1500"):
        compare_greedy([_completion([5, 6, 7, 8], [-1.15] * 4), same[1]], ref)
    with pytest.raises(AssertionError, match="mean 0.0500"):
        compare_greedy([_completion([5, 6, 7, 8], [-1.05] * 4), _completion([9, 10, 11, 12], [-2.05] * 4)], ref)
    early = [_completion([5, 6, 7, 9], [-1.0] * 4), _completion([9, 10, 11, 12], [-2.0] * 4)]
    early[0].top[3] = flip[0].top[3]
    ref[1].top[0] = {9: -2.0, 10: -2.01}
    early[1] = _completion([10, 10, 11, 12], [-2.0] * 4)
    early[1].top[0] = {10: -2.0, 9: -2.01}
    with pytest.raises(AssertionError, match="only 3 of 8 tokens compared"):
        compare_greedy(early, ref)


def qwen3_like_dummy(model_dir: Path) -> Path:
    """Qwen3-30B-A3B's shapes cut to 2 layers of 16 experts (top-4, intermediate 256) and a 512-token vocabulary,
    dummy weights, with the id tokenizer (test_gpu.write_id_tokenizer): token ids read back through the API."""
    from support import write_id_tokenizer

    spec = json.loads((Path(__file__).parents[2] / "configs/models/qwen3-30b-a3b/config.json").read_text())
    spec.update(num_hidden_layers=2, num_experts=NUM_EXPERTS, num_experts_per_tok=4, moe_intermediate_size=256,
                vocab_size=512)
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(spec))
    write_id_tokenizer(model_dir, spec["vocab_size"])
    return model_dir


@pytest.mark.gpu
@two_gpus_with_nixl_ep
def test_serving_with_nixl_ep_through_grow_and_shrink(tmp_path):
    """Served on one GPU (the reference), grown to two (nixl_ep connects), shrunk to the joiner (disconnects), grown
    again (the freed seat is reused): after each event the same greedy token ids as the one-rank reference, up to
    near-ties (compare_greedy), for 16 token-id prompts sent at once (both ranks serve some)."""
    from support import start_head
    from support import PROMPT_IDS, complete, scale

    head = start_head(tmp_path / "run", ranks=1, parallel={"device": "cuda", "backend": "nixl_ep"},
                      model={"path": str(qwen3_like_dummy(tmp_path / "model")), "load_format": "dummy",
                             "dtype": "bfloat16", "max_model_len": 512},
                      engine={"max_num_batched_tokens": 256, "num_kv_blocks": 4096})
    runs, events, members = {}, {}, {}
    try:
        def serve(name):
            runs[name] = complete(head.url, head.model, PROMPT_IDS, 16, top=2)
            members[name] = head.state()["members"]

        serve("one")
        events["grow"] = scale(head, "grow", {"n": 1})
        serve("two")
        events["shrink"] = scale(head, "shrink", {"rank_ids": [members["two"][0]]})
        serve("after")
        events["grow again"] = scale(head, "grow", {"n": 1})
        serve("again")
    finally:
        head.stop()
    for name, event in events.items():
        print(f"{name}: {event}")
    assert all(e["phase"] == "DONE" for e in events.values()), events
    assert [len(members[n]) for n in ("one", "two", "after", "again")] == [1, 2, 1, 2], members
    assert members["after"] == members["two"][1:]  # the joiner serves alone
    failures = []
    for name in ("two", "after", "again"):
        try:
            print(f"{name} vs one rank:", compare_greedy(runs[name], runs["one"]))
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
