"""Stateless per-epoch groups: rebuilt many times, in different sizes, in the same processes, without leaks."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os

import torch
import torch.distributed as dist

from eep_hpc.parallel.groups import EpochGroup, connect_store

NUM_PROCS = 3
EPOCHS = 50


def _resources() -> tuple[int, int, int]:
    fds = len(os.listdir("/proc/self/fd"))
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return fds, int(status["Threads"]), int(status["VmRSS"].split()[0])


def _worker(rank: int, port: int, results):
    torch.set_num_threads(1)
    store = connect_store("127.0.0.1", port)
    seen = {}
    for epoch in range(EPOCHS):
        size = 1 + epoch % NUM_PROCS  # sizes 1, 2, 3, 1, 2, 3, ...
        if rank < size:
            group = EpochGroup(store, epoch, rank, size, torch.device("cpu"), timeout_s=30)
            assert group.all_reduce_max([rank, -rank]) == [size - 1, 0]
            # every rank sends (dst + 1) rows of its rank id to each dst
            send = torch.cat([torch.full((dst + 1, 2), float(rank)) for dst in range(size)])
            recv = torch.empty(size * (rank + 1), 2)
            group.all_to_all(recv, send, [rank + 1] * size, [dst + 1 for dst in range(size)])
            want = torch.cat([torch.full((rank + 1, 2), float(src)) for src in range(size)])
            assert torch.equal(recv, want)
            group.destroy()
        if epoch in (5, EPOCHS - 1):
            seen[epoch] = _resources()
        store.set(f"done/{epoch}/{rank}", "1")
        store.wait([f"done/{epoch}/{r}" for r in range(NUM_PROCS)])  # next epoch only when all finished this one
    results.put((rank, seen[5], seen[EPOCHS - 1]))


def test_groups_rebuilt_fifty_times_without_leaks():
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, master.port, results)) for r in range(NUM_PROCS)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    for rank, (fds0, threads0, rss0), (fds1, threads1, rss1) in got:
        assert fds1 <= fds0, f"rank {rank}: open file descriptors grew {fds0} -> {fds1}"
        assert threads1 <= threads0, f"rank {rank}: threads grew {threads0} -> {threads1}"
        assert rss1 - rss0 < 32 * 1024, f"rank {rank}: resident memory grew {(rss1 - rss0) // 1024} MiB"
