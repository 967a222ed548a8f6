"""Where a decode step's time goes, on one GPU: the model alone (no scheduler, sampler or sockets), eager vs CUDA
graph, timed with CUDA events, beside the memory roofline (`step_gpu_ms`: the graph replay plus the LM head and
the greedy pick, the bytes the roofline counts); plus the heaviest kernels of a graph-less step.

    python -m eep_hpc.bench.step_profile --config configs/qwen3-30b-a3b-dummy.toml --batch 1 64 256 --context 320

--baseline-env VAR=VALUE ... first measures the decode rows and kernel tables with those variables set (graphs
captured afresh), then without, and prints both side by side: a before/after of kernel switches in one process,
e.g. `--baseline-env EEP_HPC_SKINNY_GEMM=0 EEP_HPC_ATTN_LIVE_SEGMENTS=0` (cuBLAS projections, every split-KV
segment run and merged).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from pathlib import Path

import torch

from eep_hpc.bench.roofline import measure_bandwidth, prefill_flops_per_token, roofline
from eep_hpc.config import load_config
from eep_hpc.engine.cuda_graphs import StepGraphs
from eep_hpc.engine.model_runner import ModelRunner
from eep_hpc.engine.rank_engine import max_model_len, resolve_dtype
from eep_hpc.model.arch import load_arch
from eep_hpc.model.loader import build_model
from eep_hpc.model.moe import ExpertParallel
from eep_hpc.parallel.all_to_all import TorchAllToAll
from eep_hpc.parallel.eplb import initial_placement
from eep_hpc.parallel.expert_map import ExpertMap
from eep_hpc.parallel.groups import EpochGroup


@contextlib.contextmanager
def env_set(pairs: dict[str, str]):
    """The variables set while the block runs (kernel switches read at each call), as they were after it."""
    saved = {k: os.environ.get(k) for k in pairs}
    os.environ.update(pairs)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cuda_ms(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def host_ms(fn, repeats: int) -> float:
    """Wall time per call including the launches (what the engine's loop pays)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / repeats


def kernel_table(prof, top: int) -> list[dict]:
    return [{"name": e.key[:80], "calls": e.count, "device_us": round(e.device_time_total, 1)}
            for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:top]]


def profile_prefill(runner: ModelRunner, ep: ExpertParallel, arch, seqs: int, n: int, repeats: int, top: int) -> dict:
    """An eager prefill step of `seqs` prompts of `n` random tokens each: GPU and wall time, its heaviest kernels,
    and tokens/s against the compute roofline."""
    bs = runner.block_size
    width = -(-n // bs)
    tables = [list(range(1 + i * width, 1 + (i + 1) * width)) for i in range(seqs)]
    ids = torch.randint(0, arch.vocab_size, (seqs * n,), generator=torch.Generator().manual_seed(n)).tolist()
    slots = [t[p // bs] * bs + p % bs for t in tables for p in range(n)]
    ep.plan(chunks=1, chunk_tokens=seqs * n)
    step = lambda: runner.forward(ids, list(range(n)) * seqs, slots, [n] * seqs, [n] * seqs, tables, ep)
    gpu_ms, wall_ms = cuda_ms(step, max(2, repeats // 4)), host_ms(step, max(2, repeats // 4))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    ep.take_load()
    tokens = seqs * n
    flops = prefill_flops_per_token(arch, n) * tokens
    row = {"seqs": seqs, "len": n, "gpu_ms": gpu_ms, "wall_ms": wall_ms, "tok_per_s": tokens / gpu_ms * 1000,
           "tflops": flops / gpu_ms / 1e9, "launches": sum(e.count for e in prof.key_averages()),
           "device_us_total": round(sum(e.device_time_total for e in prof.key_averages()), 1),
           "top": kernel_table(prof, top)}
    print(json.dumps({k: v for k, v in row.items() if k != "top"}), flush=True)
    return row


def print_comparison(baseline: dict, rows: list[dict], profiles: dict) -> None:
    """Step times and per-kernel device time, baseline (the --baseline-env variables set) against now."""
    print(f"\nbefore = {baseline['env']}, after = without them")
    for before, after in zip(baseline["rows"], rows):
        print(f"batch {after['batch']:4}: graph {before['graph_gpu_ms']:.3f} -> {after['graph_gpu_ms']:.3f} ms, step "
              f"{before['step_gpu_ms']:.3f} -> {after['step_gpu_ms']:.3f} ms ({before['step_vs_roofline']:.2f}x -> "
              f"{after['step_vs_roofline']:.2f}x of the roofline, {after['roofline_ms']:.3f} ms)")
    for key, after in profiles.items():
        before = baseline["eager_kernels"].get(key)
        if before is None:
            continue
        if "tok_per_s" in after:
            print(f"\n{key}: {before['gpu_ms']:.1f} -> {after['gpu_ms']:.1f} ms, {before['tok_per_s']:,.0f} -> "
                  f"{after['tok_per_s']:,.0f} tok/s, {before['tflops']:.0f} -> {after['tflops']:.0f} TFLOP/s")
        print(f"\n{key}: eager step kernels, device us (calls); launches {before['launches']} -> {after['launches']}, "
              f"total {before['device_us_total']} -> {after['device_us_total']}; then the LM head")
        for part in ("top", "lm_head_kernels"):
            if part not in after:
                continue
            b_rows = {k["name"]: k for k in before[part]}
            a_rows = {k["name"]: k for k in after[part]}
            size = lambda n: -max(b_rows.get(n, {}).get("device_us", 0), a_rows.get(n, {}).get("device_us", 0))
            for name in sorted(set(b_rows) | set(a_rows), key=size):
                b, a = b_rows.get(name, {}), a_rows.get(name, {})
                print(f"  {name[:64]:64} {b.get('device_us', 0):8.1f} ({b.get('calls', 0):3}) -> "
                      f"{a.get('device_us', 0):8.1f} ({a.get('calls', 0):3})")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/qwen3-30b-a3b-dummy.toml")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--context", type=int, default=320)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--top-kernels", type=int, default=15)
    p.add_argument("--profile-batch", type=int, nargs="+", default=[1], help="batch sizes whose eager kernels to list")
    p.add_argument("--prefill", nargs="*", default=[], metavar="SEQSxLEN",
                   help="also time and list the kernels of eager prefill steps of SEQS prompts of LEN tokens, e.g. 64x128")
    p.add_argument("--baseline-env", nargs="*", default=[], metavar="VAR=VALUE",
                   help="first measure with these environment variables set, then without; print both side by side")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    device = torch.device("cuda")
    arch = load_arch(cfg.model.path)
    dtype = resolve_dtype(cfg, arch, device)
    placement = initial_placement(len(arch.moe_layers), arch.num_experts, [arch.num_experts])
    expert_map = ExpertMap(placement.physical_to_logical.tolist(), placement.slot_offsets, 0, arch.num_experts, device)
    local = [expert_map.local_logical(layer) for layer in range(len(arch.moe_layers))]
    model = build_model(arch, cfg.model, Path(cfg.model.path), local, max_model_len(cfg, arch), device, dtype)
    ep = ExpertParallel(expert_map, TorchAllToAll(EpochGroup(None, 0, 0, 1, device)), arch.num_experts)
    bs, ctx = cfg.engine.block_size, args.context
    max_b = max(args.batch)
    blocks_per_seq = -(-(ctx + 1) // bs)
    prefills = [tuple(int(x) for x in spec.split("x")) for spec in args.prefill]
    prefill_blocks = max((s * -(-n // bs) for s, n in prefills), default=0)
    runner = ModelRunner(model, max(max_b * blocks_per_seq, prefill_blocks) + 1, bs, device, dtype)
    bw = measure_bandwidth()

    def measure() -> tuple[list[dict], dict]:
        graphs = StepGraphs(model, runner.kv_caches, bs, max_b, blocks_per_seq, device)  # captured afresh
        rows = []
        for b in args.batch:
            tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(b)]
            slots = [t[ctx // bs] * bs + ctx % bs for t in tables]
            # random token ids, as `eep-hpc bench` sends: routing spreads over the experts as the roofline assumes
            ids = torch.randint(0, arch.vocab_size, (b,), generator=torch.Generator().manual_seed(b)).tolist()
            inputs = (ids, [ctx] * b, slots, [ctx + 1] * b, tables)
            eager = lambda: runner.forward(inputs[0], inputs[1], inputs[2], [1] * b, inputs[3], inputs[4], ep)
            graphed = lambda: graphs.run(*inputs[:3], [1] * b, *inputs[3:], ep, b)
            # what the roofline counts: the layers, the LM head and the greedy pick (the engine's decode step)
            whole = lambda: model.compute_logits(graphs.run(*inputs[:3], [1] * b, *inputs[3:], ep, b)).argmax(dim=-1)
            roof = roofline(arch, b, ctx + 1, bw)
            row = {"batch": b, "context": ctx, "eager_gpu_ms": cuda_ms(eager, args.repeats),
                   "eager_wall_ms": host_ms(eager, args.repeats), "graph_gpu_ms": cuda_ms(graphed, args.repeats),
                   "graph_wall_ms": host_ms(graphed, args.repeats), "step_gpu_ms": cuda_ms(whole, args.repeats),
                   "roofline_ms": roof["step_floor_ms"], "bytes": roof["total_bytes"]}
            row["step_vs_roofline"] = row["step_gpu_ms"] / row["roofline_ms"]
            print(json.dumps(row), flush=True)
            rows.append(row)
        graphs.reset()
        del graphs
        torch.cuda.empty_cache()
        # the heaviest kernels of one eager step (a graph replay hides its kernels from the profiler)
        profiles = {}
        for b in args.profile_batch:
            tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(b)]
            slots = [t[ctx // bs] * bs + ctx % bs for t in tables]
            ids = torch.randint(0, arch.vocab_size, (b,), generator=torch.Generator().manual_seed(b)).tolist()
            step = lambda: runner.forward(ids, [ctx] * b, slots, [1] * b, [ctx + 1] * b, tables, ep)
            hidden = step()
            model.compute_logits(hidden)
            ep.take_load()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
            kernels = kernel_table(prof, args.top_kernels)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as head_prof:
                model.compute_logits(hidden)
                torch.cuda.synchronize()
            profiles[f"batch{b}"] = {
                "launches": sum(e.count for e in prof.key_averages()),
                "device_us_total": round(sum(e.device_time_total for e in prof.key_averages()), 1),
                # distinct experts the batch's tokens reached per MoE layer: what the step must read
                "experts_touched_per_layer": round((ep.take_load() > 0).sum(dim=1).float().mean().item(), 1),
                "top": kernels,
                "lm_head_kernels": kernel_table(head_prof, 4),  # the LM head and its fp32 cast (not in the total)
            }
        return rows, profiles

    baseline = None
    if args.baseline_env:
        pairs = dict(kv.split("=", 1) for kv in args.baseline_env)
        print(f"baseline: {pairs}", flush=True)
        with env_set(pairs):
            base_rows, base_profiles = measure()
            for seqs, n in prefills:
                base_profiles[f"prefill{seqs}x{n}"] = profile_prefill(runner, ep, arch, seqs, n, args.repeats,
                                                                      args.top_kernels)
        baseline = {"env": pairs, "rows": base_rows, "eager_kernels": base_profiles}
        print("now: without the baseline's variables", flush=True)
    rows, profiles = measure()
    for seqs, n in prefills:
        profiles[f"prefill{seqs}x{n}"] = profile_prefill(runner, ep, arch, seqs, n, args.repeats, args.top_kernels)
    result = {"config": args.config, "device": torch.cuda.get_device_name(), "bandwidth_gbps": bw, "rows": rows,
              "eager_kernels": profiles}
    print(json.dumps(profiles, indent=1))
    if baseline is not None:
        result["baseline"] = baseline
        print_comparison(baseline, rows, profiles)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
