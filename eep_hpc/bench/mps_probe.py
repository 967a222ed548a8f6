"""Which CUDA calls of one process wait for another process's kernels on the same GPU (one-GPU lab, MPS or not).

Two ranks sharing a GPU under MPS hung in their first expert exchange: one rank's dispatch kernel spins until its
peer's arrives, and if the peer's host meanwhile makes a call that waits for every kernel on the GPU, neither moves.
This probe names such calls. A `spinner` process runs long kernels (`torch.cuda._sleep`), one at a time; a `prober`
process makes one kind of call during each and times it. A call that takes about the rest of the spin waits for it.

    python -m eep_hpc.bench.mps_probe [--spin-s 3] [--out FILE]     (start an MPS daemon first to probe MPS)
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time

PROBES = ["launch_known_kernel", "own_stream_sync", "first_torch_kernel", "first_triton_kernel", "new_segment",
          "empty_cache"]


def _spinner(spin_s: float, started, done) -> None:
    import torch

    torch.cuda.init()
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    t0 = time.monotonic()
    torch.cuda._sleep(200_000_000)
    torch.cuda.synchronize()
    cycles = int(spin_s * 200_000_000 / (time.monotonic() - t0))
    for _ in PROBES:
        torch.cuda._sleep(cycles)
        started.put(time.monotonic())
        torch.cuda.synchronize()
        done.put(time.monotonic())


def _triton_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    return add_one


def _prober(started, done, results) -> None:
    import torch

    x = torch.ones(1024, device="cuda")
    (x * 2).sum().item()  # the context, the allocator, a known kernel
    kernel = _triton_kernel()
    out = {}
    for name in PROBES:
        t_spin = started.get()
        time.sleep(0.2)
        t0 = time.monotonic()
        if name == "launch_known_kernel":
            x.mul_(1.0)
        elif name == "own_stream_sync":
            x.mul_(1.0)
            torch.cuda.current_stream().synchronize()
        elif name == "first_torch_kernel":  # lazy module loading: a kernel this process never ran
            torch.special.bessel_j0(x)
            torch.cuda.current_stream().synchronize()
        elif name == "first_triton_kernel":  # compile (host only) and load the module, then launch
            kernel[(1,)](x, x.numel(), BLOCK=1024)
            torch.cuda.current_stream().synchronize()
        elif name == "new_segment":  # cudaMalloc of a segment the allocator does not have
            torch.empty(2**30, dtype=torch.uint8, device="cuda")
        elif name == "empty_cache":  # cudaFree of the cached segments
            torch.cuda.empty_cache()
        took = time.monotonic() - t0
        t_end = done.get()
        out[name] = {"took_s": round(took, 3), "spin_left_s": round(t_end - t0, 3),
                     "waited_for_peer": took > 0.5 * (t_end - t0) and took > 0.5}
        del t_spin
    results.put(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spin-s", type=float, default=3.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    started, done, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_spinner, args=(args.spin_s, started, done)),
             ctx.Process(target=_prober, args=(started, done, results))]
    for p in procs:
        p.start()
    out = {"mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")), "spin_s": args.spin_s, "probes": results.get()}
    for p in procs:
        p.join()
    print(json.dumps(out, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
