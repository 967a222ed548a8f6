"""Two benchmark processes that meet through a TCPStore: the shape of the micro-benchmarks between two ranks."""

from __future__ import annotations

import datetime
import importlib

import torch.distributed as dist
import torch.multiprocessing as mp


def spawn_two(module: str, worker_name: str, args, timeout_s: float = 600) -> None:
    """Run `module.worker_name(i, store_port, args)` in two spawned processes, i = 0 and 1, and wait for both.
    The worker is looked up by module name: under `python -m` the spawned children import the module again
    and must find it there, not in `__main__`."""
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=timeout_s))
    worker = getattr(importlib.import_module(module), worker_name)
    mp.spawn(worker, args=(master.port, args), nprocs=2, join=True)
