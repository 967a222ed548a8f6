"""A joiner's dense weights over real NIXL between two processes (RankAgent.publish_dense / fetch_dense), read in
pieces: every tensor arrives with the source's bytes, also when the pieces are much smaller than the whole. On the
CPU with small tensors; on a GPU (skipped without one) both processes on the same card, with Qwen3-30B-A3B's 2 GB
of dense weights at 24 layers (one READ of all of them never ended there: results/README.md, the lab's grow)."""

from __future__ import annotations

import datetime
import time

import pytest
import torch

from support import spawn_workers

pytest.importorskip("nixl")

SHAPES = {"embed": (300, 64), "layer0.qkv": (96, 64), "layer0.norm": (64,), "layer1.qkv": (96, 64), "head": (64, 300)}


# Qwen3-30B-A3B's dense weights at 24 layers, bf16: embedding and head 151936 x 2048, per layer attention
# (q 4096, k and v 512 each, o back to 2048), the router (128 experts) and two norms: 2,063 MiB
QWEN3_24 = {"embed": (151936, 2048), "head": (151936, 2048),
            **{f"layer{i}.{n}": s for i in range(24)
               for n, s in (("qkv", (5120, 2048)), ("o", (2048, 4096)), ("router", (128, 2048)),
                            ("norm1", (2048,)), ("norm2", (2048,)))}}


def _tensors(shapes: dict, seed: int, fill: bool, device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return {k: (torch.randn(*s, generator=g, device=device) if fill else torch.zeros(*s, device=device))
            .to(torch.bfloat16) for k, s in shapes.items()}


def _worker(i: int, port: int, results, piece: int, shapes: dict = SHAPES, device: str = "cpu") -> None:
    from eep_hpc import signing
    from eep_hpc.parallel import weight_transfer
    from eep_hpc.parallel.groups import connect_store

    signing.use_secret(b"dense-reads-test-secret-32-bytes")
    weight_transfer.READ_PIECE_BYTES = piece
    if device != "cpu":
        torch.cuda.set_device(device)
    store = connect_store("127.0.0.1", port, timeout_s=60)
    agent = weight_transfer.RankAgent(i, store)
    if i == 0:
        source = _tensors(shapes, 1, fill=True, device=device)  # kept alive while the reader reads it
        agent.publish_dense(source)
        store.set("ready", "1")
        store.wait(["done"], datetime.timedelta(seconds=60))
        return
    store.wait(["ready"], datetime.timedelta(seconds=60))
    got = _tensors(shapes, 0, fill=False, device=device)
    posted = []
    initialize_xfer = agent.agent.initialize_xfer
    agent.agent.initialize_xfer = lambda *a, **k: posted.append(a[0]) or initialize_xfer(*a, **k)
    t0 = time.monotonic()
    peer, nbytes = agent.fetch_dense([0], got, timeout_s=20)
    results["seconds"] = time.monotonic() - t0
    results["reads"] = len(posted)
    want = _tensors(shapes, 1, fill=True, device=device)
    results["peer"], results["bytes"] = peer, nbytes
    results["equal"] = [k for k in shapes if torch.equal(got[k], want[k])]
    store.set("done", "1")


def _run_pair(piece: int, shapes: dict, device: str) -> dict:
    return spawn_workers(_worker, 2, piece, shapes, device, timeout_s=120)


@pytest.mark.parametrize("piece,reads", [(2**30, 1), (20_000, 4)], ids=["one piece", "pieces of 20 kB"])
def test_dense_weights_arrive_whole_in_pieces(piece, reads):
    results = _run_pair(piece, SHAPES, "cpu")
    total = sum(torch.Size(s).numel() * 2 for s in SHAPES.values())
    assert (results["peer"], results["bytes"]) == (0, total)
    assert results["equal"] == list(SHAPES)
    # tensors larger than a piece are cut (38.4 kB -> 20 kB + 18.4 kB), and a piece ends once past 20 kB:
    # 20 | 18.4 + 12.3 | 0.1 + 12.3 + 20 | 18.4
    assert results["reads"] == reads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_dense_weights_between_two_processes_on_one_gpu():
    from eep_hpc.parallel.weight_transfer import READ_PIECE_BYTES

    results = _run_pair(READ_PIECE_BYTES, QWEN3_24, "cuda:0")
    total = sum(torch.Size(s).numel() * 2 for s in QWEN3_24.values())
    print(f"{total / 2**20:,.0f} MiB in {results['reads']} READs, {results['seconds']:.2f} s")
    assert (results["peer"], results["bytes"]) == (0, total)
    assert results["equal"] == list(QWEN3_24)


def _relay_worker(i: int, port: int, results) -> None:
    """0 serves its weights; 1 reads them, then serves the tensors it read them into; 2 reads those from 1."""
    from eep_hpc import signing
    from eep_hpc.parallel import weight_transfer
    from eep_hpc.parallel.groups import connect_store

    signing.use_secret(b"dense-reads-test-secret-32-bytes")
    store = connect_store("127.0.0.1", port, timeout_s=60)
    agent = weight_transfer.RankAgent(i, store)
    registered = []
    register_memory = agent.agent.register_memory
    agent.agent.register_memory = lambda *a, **k: registered.append(1) or register_memory(*a, **k)
    wait = lambda key: store.wait([key], datetime.timedelta(seconds=60))  # noqa: E731
    if i == 0:
        source = _tensors(SHAPES, 1, fill=True)
        agent.publish_dense(source)
        store.set("served/0", "1")
        wait("done")
        return
    wait(f"served/{i - 1}")
    got = _tensors(SHAPES, 0, fill=False)
    results[f"peer{i}"] = agent.fetch_dense([i - 1], got, timeout_s=20)[0]
    want = _tensors(SHAPES, 1, fill=True)
    results[f"equal{i}"] = [k for k in SHAPES if torch.equal(got[k], want[k])]
    if i == 1:
        agent.publish_dense(got)
        results["registrations1"] = len(registered)
        store.set("served/1", "1")
        wait("done")
    else:
        store.set("done", "1")


def test_a_joiner_serves_the_weights_it_read_under_the_same_registration():
    """A rank that joined by reading its dense weights serves them to the next joiner (its source may be gone by
    then), registered once: the registration of its read is kept for serving (a second registration of GBs of
    VRAM would come at its first step, while its peers wait)."""
    results = spawn_workers(_relay_worker, 3, timeout_s=120)
    assert (results["peer1"], results["peer2"]) == (0, 1)
    assert results["equal1"] == results["equal2"] == list(SHAPES)
    assert results["registrations1"] == 1
