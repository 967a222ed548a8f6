"""A joiner's dense weights over real NIXL between two processes on the CPU (RankAgent.publish_dense /
fetch_dense), read in pieces: every tensor arrives with the source's bytes, also when the pieces are much smaller
than the whole (one READ of all of them, 2 GB for Qwen3-30B-A3B, never ended between two processes on one H100)."""

from __future__ import annotations

import datetime
import multiprocessing as mp

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("nixl")

SHAPES = {"embed": (300, 64), "layer0.qkv": (96, 64), "layer0.norm": (64,), "layer1.qkv": (96, 64), "head": (64, 300)}


def _tensors(seed: int, fill: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(*s, generator=g) if fill else torch.zeros(*s)).to(torch.bfloat16)
            for k, s in SHAPES.items()}


def _worker(i: int, port: int, piece: int, results) -> None:
    from eep_hpc import signing
    from eep_hpc.parallel import weight_transfer
    from eep_hpc.parallel.groups import connect_store

    signing.use_secret(b"dense-reads-test-secret-32-bytes")
    weight_transfer.READ_PIECE_BYTES = piece
    store = connect_store("127.0.0.1", port, timeout_s=60)
    agent = weight_transfer.RankAgent(i, store)
    if i == 0:
        source = _tensors(1, fill=True)  # kept alive while the reader reads it
        agent.publish_dense(source)
        store.set("ready", "1")
        store.wait(["done"], datetime.timedelta(seconds=60))
        return
    store.wait(["ready"], datetime.timedelta(seconds=60))
    got = _tensors(0, fill=False)
    posted = []
    initialize_xfer = agent.agent.initialize_xfer
    agent.agent.initialize_xfer = lambda *a, **k: posted.append(a[0]) or initialize_xfer(*a, **k)
    peer, nbytes = agent.fetch_dense([0], got, timeout_s=20)
    results["reads"] = len(posted)
    want = _tensors(1, fill=True)
    results["peer"], results["bytes"] = peer, nbytes
    results["equal"] = [k for k in SHAPES if torch.equal(got[k], want[k])]
    store.set("done", "1")


@pytest.mark.parametrize("piece,reads", [(2**30, 1), (20_000, 3)], ids=["one piece", "pieces of 20 kB"])
def test_dense_weights_arrive_whole_in_pieces(piece, reads):
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=60))
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=_worker, args=(i, master.port, piece, results)) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    total = sum(torch.Size(s).numel() * 2 for s in SHAPES.values())
    assert (results["peer"], results["bytes"]) == (0, total)
    assert results["equal"] == list(SHAPES)
    assert results["reads"] == reads  # 38.4 kB | 12.3 kB + 128 B + 12.3 kB | 38.4 kB: a piece ends past 20 kB
