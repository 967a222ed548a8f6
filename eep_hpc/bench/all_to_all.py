"""MoE dispatch + combine per layer: this project's nixl_ep backend against raw nixl_ep and the torch/NCCL backend.

    python -m eep_hpc.bench.all_to_all [--tokens 1 64 256] [--out FILE]

Two ranks: on two GPUs, or two processes sharing one GPU (then without NCCL, which refuses two ranks on one
device). Writes a JSON report (default: results/<GPU name>/nixl-ep-all-to-all.json)."""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from eep_hpc.config import load_config
from eep_hpc.parallel.all_to_all import TorchAllToAll
from eep_hpc.parallel.expert_map import ExpertMap
from eep_hpc.bench.two_processes import spawn_two
from eep_hpc.parallel.groups import EpochGroup, connect_store
from eep_hpc.parallel import nixl_ep_all_to_all as nx
from eep_hpc.parallel.nixl_ep_all_to_all import NixlEpAllToAll


def _bench_worker(i: int, port: int, args) -> None:
    from types import SimpleNamespace

    from eep_hpc import protocol as P

    shared = torch.cuda.device_count() < 2
    dev = torch.device("cuda", 0 if shared else i)
    torch.cuda.set_device(dev)
    E, k, D = args.experts, args.top_k, args.hidden
    cfg = load_config(None, parallel={"backend": "nixl_ep", "ranks": 2, "moe_chunk_tokens": max(args.tokens)},
                      model={"dtype": "bfloat16"}, engine={"cuda_graphs": False})
    store = connect_store("127.0.0.1", port, timeout_s=120)
    offsets = [0, E // 2, E]
    epoch = P.Epoch(epoch=1, rank_ids=[0, 1], store_host="127.0.0.1", store_port=port,
                    physical_to_logical=[list(range(E))], slot_offsets=offsets)
    group = EpochGroup(store, 1, i, 2, dev, timeout_s=120)
    emap = ExpertMap(epoch.physical_to_logical, offsets, i, E, dev)
    nixl = NixlEpAllToAll.for_epoch(cfg, SimpleNamespace(hidden_size=D, torch_dtype=torch.bfloat16), epoch, group, emap)
    torch_a2a = None if shared else TorchAllToAll(group)
    gen = torch.Generator(device=dev).manual_seed(1234 + i)
    results = []
    for T in args.tokens:
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, generator=gen)
        scores = torch.randn(T, E, device=dev, generator=gen).softmax(-1)
        w, ids = scores.topk(k, dim=-1)
        w = w / w.sum(-1, keepdim=True)  # fp32, as the router hands nixl_ep its weights
        slots = emap.choose_slots(0, ids)
        topk, wf = nixl.expert_of_slot[slots].to(nixl.topk_dtype).contiguous(), w.float().contiguous()

        def ours(a2a, x=x, slots=slots, w=w):  # dispatch -> (identity expert) -> combine, as ExpertParallel does
            # (the router emits destinations directly: to_destinations runs once per epoch, on its table)
            dests = dest_of[id(a2a)]
            rows, _, handle = a2a.dispatch(x, dests, emap.slot_owner, emap.local_start, T)
            return a2a.combine(rows, w.to(a2a.weights_dtype or x.dtype), handle)

        dest_of = {id(a): a.to_destinations(slots) for a in (nixl, torch_a2a) if a is not None}

        def raw(x=x, topk=topk, wf=wf):  # nixl_ep alone, no conversion to packed rows
            recv, _, handle, _, _ = nixl.buffer.low_latency_dispatch(x, topk, nixl.max_tokens,
                                                                     num_experts=nixl.num_experts, use_fp8=False)
            return nixl.buffer.low_latency_combine(recv, topk, wf, handle)[0]

        a = ours(nixl).float()
        b = ours(torch_a2a).float() if torch_a2a else raw().float()  # the identity expert: combine(dispatch(x))
        rel = float((a - b).norm() / b.norm().clamp_min(1e-6)) if T else 0.0
        runs = [("nixl_ep", lambda: ours(nixl)), ("nixl_ep_raw", raw)]
        if torch_a2a:
            runs.append(("torch_nccl", lambda: ours(torch_a2a)))
        for name, fn in runs:
            for _ in range(args.warmup):
                fn()
        # the variants take turns, round by round (a shared GPU drifts), each round timed on both ranks together
        per_round = max(1, args.iters // args.rounds)
        times: dict[str, list[float]] = {name: [] for name, _ in runs}
        for r in range(args.rounds):
            for name, fn in (runs if r % 2 == 0 else runs[::-1]):
                torch.cuda.synchronize()
                group.all_reduce_max([0])
                t0 = time.perf_counter()
                for _ in range(per_round):
                    fn()
                torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) / per_round * 1e6)
        for name, _ in runs:
            results.append({"tokens": T, "backend": name, "us": statistics.median(times[name]),
                            "us_rounds": [round(t, 2) for t in times[name]], "rel_err_vs_reference": rel})
    store.set(f"bench/{i}", json.dumps(results))
    if i == 0:
        other = json.loads(store.get("bench/1"))
        rows = [{**r, "us": max(r["us"], o["us"]), "us_per_rank": [r["us"], o["us"]]} for r, o in zip(results, other)]
        try:
            from importlib.metadata import version
            nixl_version = version("nixl-cu13")
        except Exception:
            nixl_version = "?"
        report = {"what": "MoE dispatch + combine per layer (identity expert), 2 ranks, wall time per iteration (median round)",
                  "ranks_share_one_gpu": shared, "reference": "raw nixl_ep" if shared else "torch/NCCL backend",
                  "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "nixl": nixl_version,
                  "hidden": D, "experts": E, "top_k": k, "max_tokens": nixl.max_tokens,
                  "iters": args.iters, "rounds": args.rounds,
                  "command": args.command, "results": rows}
        out = args.out or f"results/{torch.cuda.get_device_name(dev).replace(' ', '-')}/nixl-ep-all-to-all.json"
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out, "w") as f:
            json.dump(report, f, indent=1)
        print("wrote", out)
        for r in rows:
            print(f"{r['tokens']:5d} tokens/rank  {r['backend']:12s} {r['us']:9.1f} us  (rel err vs reference "
                  f"{r['rel_err_vs_reference']:.1e})")
    group.all_reduce_max([0])
    nx._runtime.close()
    group.destroy()


def main(argv: list[str] | None = None) -> None:
    import argparse


    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256], help="tokens per rank")
    ap.add_argument("--hidden", type=int, default=2048)  # Qwen3-30B-A3B
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=10, help="the variants alternate this many times; the median "
                    "round is reported")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--out", default="", help="default: results/<GPU name>/nixl-ep-all-to-all.json")
    args = ap.parse_args(argv)
    args.command = "python -m eep_hpc.bench.all_to_all " + " ".join(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        raise SystemExit("the benchmark needs a CUDA GPU (two ranks share it when there is only one)")
    spawn_two(__spec__.name, "_bench_worker", args, timeout_s=120)


if __name__ == "__main__":
    main()
