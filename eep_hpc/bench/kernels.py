"""Time the Triton kernels against the torch references at Qwen3-30B-A3B shapes (one rank holding all 128 experts).

    python -m eep_hpc.bench.kernels [--out results.json] [--reps 50] [--sweep]
                                    [--only moe,moe_fp8,moe_batched,linear,...]

Per call, CUDA events around each call, median of --reps after warm-up (compilation stays out). Inputs are random
(never zeros). Also checks that the decode paths capture into a CUDA graph and replay to the eager result, and times
the replays. --sweep also times a few tile configs per case (to tune `pick_config`). `moe_fp8` times the same MoE
cases with the weights quantised to fp8 (e4m3, 128 x 128 block scales, as Qwen3-30B-A3B-FP8) and bf16 activations,
beside the bf16 rows of `moe`; its error is against the dequantised weights (the kernel's own error, not fp8's).
`linear` times the skinny GEMM (triton_linear.py) against cuBLAS (F.linear) at the dense projections' shapes for
1, 4 and 16 rows, cycling through enough weight copies that L2 (50 MB) holds none of them between calls (as in a
step, where every layer has its own weights; the router gate's 0.5 MB copies stay in L2 all the same: its time is
latency); `pct_of_copy_bw` is the weight stream against a measured copy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import traceback

import torch

from eep_hpc.kernels.attention import AttentionMetadata, paged_attention_reference, write_kv
from eep_hpc.kernels.fp8 import BlockScales, dequantize_blockwise, dequantize_w13, quantize_blockwise, quantize_w13
from eep_hpc.kernels.moe import swiglu_experts_reference
from eep_hpc.kernels.norm import rms_norm_reference

HIDDEN, MOE_I, EXPERTS, TOP_K, HQ, HKV, HEAD_D, PAGE = 2048, 768, 128, 8, 32, 4, 128, 16
# MoE cases by tokens per step: decode batches, and prefill steps up to max_num_batched_tokens (8,192: M = 65,536)
CASES = [("decode-1", 1), ("decode-64", 64), ("decode-256", 256), ("prefill-512", 512), ("prefill-2048", 2048),
         ("prefill-8192", 8192)]


def eager_us(fn, reps: int, warmup: int = 3) -> float:
    """Median microseconds of one eager call, CUDA events around it: host launch cost included (what an
    uncaptured step pays)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


INNER = 10


def gpu_us(fn, reps: int):
    """(median microseconds per call of device time, output of the last captured call): INNER calls captured
    into one CUDA graph, replays timed with events, so host launch cost stays out. None if fn cannot be captured."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(INNER):
                out = fn()
        return eager_us(graph.replay, reps) / INNER, out
    except Exception as e:  # e.g. a host sync inside fn
        print(f"not capturable: {type(e).__name__}: {str(e)[:120]}", flush=True)
        torch.cuda.synchronize()
        return None, None


def timings(row: dict, triton_fn, torch_fn, reps: int, torch_reps: int, eager_out) -> dict:
    t_gpu, t_out = gpu_us(triton_fn, reps)
    r_gpu, _ = gpu_us(torch_fn, torch_reps)
    row.update(triton_us=t_gpu, torch_us=r_gpu, triton_eager_us=eager_us(triton_fn, reps),
               torch_eager_us=eager_us(torch_fn, torch_reps),
               graph_matches_eager=None if t_out is None else bool(torch.equal(t_out, eager_out)))
    return row


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bench_moe(results, reps, sweep, dtype, fp8: bool = False):
    from eep_hpc.kernels.grouped_moe import grouped_mm_available, swiglu_experts_grouped
    from eep_hpc.kernels.triton_moe import MoEConfig, pick_config, swiglu_experts_triton

    dev = torch.device("cuda")
    # inputs from the CPU's generator: a capture that fails (the torch reference is not capturable) leaves CUDA's
    # generator unusable for the rest of the process
    w13 = (torch.randn(EXPERTS, 2 * MOE_I, HIDDEN) * HIDDEN**-0.5).to(dev, dtype)
    w2 = (torch.randn(EXPERTS, HIDDEN, MOE_I) * MOE_I**-0.5).to(dev, dtype)
    configs = [MoEConfig(16, 32, 128, 1, 4, 4), MoEConfig(16, 32, 256, 1, 4, 3), MoEConfig(16, 64, 128, 1, 4, 4),
               MoEConfig(16, 64, 256, 1, 8, 3), MoEConfig(16, 128, 128, 1, 4, 4), MoEConfig(32, 64, 128, 4, 4, 4),
               MoEConfig(64, 128, 64, 8, 8, 4), MoEConfig(64, 64, 64, 8, 4, 4), MoEConfig(128, 128, 64, 8, 8, 3),
               MoEConfig(128, 64, 64, 8, 4, 4), MoEConfig(64, 128, 64, 8, 4, 4), MoEConfig(128, 128, 32, 8, 8, 4),
               MoEConfig(64, 64, 128, 8, 4, 3), MoEConfig(128, 64, 128, 8, 8, 3)]
    scales = None
    if fp8:
        block = (128, 128)
        (w13, s13), (w2, s2) = quantize_w13(w13, block), quantize_blockwise(w2, block)
        scales = BlockScales(s13, s2, block)
        w13d, w2d = dequantize_w13(w13, s13, block, torch.float64), dequantize_blockwise(w2, s2, block, torch.float64)
        # K tiles within one scale block; fp8 tiles are half the bytes, so also wider N tiles and deeper pipelines
        configs = [c for c in configs if c.BLOCK_K <= 128] + [
            MoEConfig(16, 128, 128, 1, 8, 4), MoEConfig(16, 64, 128, 1, 4, 6), MoEConfig(16, 256, 128, 1, 8, 3),
            MoEConfig(32, 128, 128, 4, 8, 4)]
    else:
        w13d, w2d = w13.double(), w2.double()
    per_expert = 3 * MOE_I * HIDDEN * w13.element_size()
    if scales is not None:
        per_expert += (scales.w13[0].numel() + scales.w2[0].numel()) * 4
    for name, tokens in CASES:
        M = tokens * TOP_K
        x = torch.randn(M, HIDDEN).to(dev, dtype)
        slot = torch.rand(tokens, EXPERTS).topk(TOP_K, dim=-1).indices.reshape(-1).to(dev)
        used = int(slot.unique().numel())
        bytes_ = used * per_expert + 2 * M * HIDDEN * x.element_size()
        ref = swiglu_experts_reference(x.double(), slot, w13d, w2d)
        cfg = pick_config(M, EXPERTS, HIDDEN, MOE_I, dtype, fp8=fp8)
        out = swiglu_experts_triton(x, slot, w13, w2, scales=scales)
        row = dict(kernel="moe-fp8" if fp8 else "moe", case=name, dtype=f"fp8-e4m3 x {dtype}" if fp8 else str(dtype),
                   M=M, slots_used=used, config=str(cfg), rel_err=rel(out, ref), bytes=bytes_, floor_us=bytes_ / 3.0e6)
        timings(row, lambda: swiglu_experts_triton(x, slot, w13, w2, scales=scales),
                lambda: swiglu_experts_reference(x, slot, w13, w2, scales), reps, 5, out)
        if tokens >= 512 and grouped_mm_available(x):  # torch's grouped GEMM for prefill sizes
            try:
                g = swiglu_experts_grouped(x, slot, w13, w2, scales=scales)
                row["grouped_mm_rel_err"] = rel(g, ref)
                row["grouped_mm_us"] = eager_us(lambda: swiglu_experts_grouped(x, slot, w13, w2, scales=scales),
                                                reps)
            except Exception as e:  # report, keep the other numbers
                row["grouped_mm_error"] = f"{type(e).__name__}: {e}"[:300]
        if sweep:
            row["sweep"] = {str(c): gpu_us(lambda c=c: swiglu_experts_triton(x, slot, w13, w2, config=c, scales=scales),
                                           reps)[0]
                            for c in configs}
        results.append(row)
        print(row, flush=True)


# the dense projections of Qwen3-30B-A3B: (name, N, K)
LINEAR_CASES = [("qkv_proj", (HQ + 2 * HKV) * HEAD_D, HIDDEN), ("o_proj", HIDDEN, HQ * HEAD_D),
                ("router_gate", EXPERTS, HIDDEN), ("lm_head", 151936, HIDDEN)]


def _linear_sweep_configs(M: int):
    """~20 one-row and ~12 tl.dot configs (each compiles once: the sweep stays near a minute)."""
    from eep_hpc.kernels.triton_linear import LinearConfig as C

    if M == 1:
        fma = [C(1, n, k, 1, 4, 1) for n, k in ((2, 2048), (4, 1024), (4, 2048), (8, 512), (8, 1024), (16, 256),
                                                (16, 512), (32, 256))]
        fma += [C(1, n, k, 1, w, st) for n, k in ((4, 2048), (8, 1024), (16, 512)) for w, st in ((8, 1), (4, 3))]
        fma += [C(1, 8, 1024, 2, 4, 1), C(1, 16, 512, 2, 4, 1)]
        return fma + [C(16, 16, 256, 1, 4, 3), C(16, 32, 256, 1, 4, 3), C(16, 16, 128, 1, 4, 4), C(16, 16, 256, 2, 4, 4)]
    return [C(16, n, k, s, 4, 3) for n in (16, 32) for k in (128, 256) for s in (1, 2)] + [
        C(16, 32, 256, 1, 4, 4), C(16, 64, 128, 1, 4, 3), C(16, 16, 512, 1, 4, 3), C(16, 32, 256, 4, 4, 3)]


def bench_moe_batched(results, reps, dtype):
    """The experts on nixl_ep's receive layout, as one rank of EP=2 / 3 / 8 sees it: x [E_local, seats * Tmax, D]
    (Tmax 512), the rows that came at the front of each expert's block. The kernels' grids cover either every
    expert's full capacity (`unbounded_us`: before) or only the blocks the rows can fill (`triton_us`: seats x the
    step's tokens per rank x top-k), at decode and small-prefill tokens per rank."""
    from eep_hpc.kernels.triton_moe import swiglu_experts_batched_triton

    dev, tmax = torch.device("cuda"), 512
    for seats in (2, 3, 8):
        e_local = -(-(EXPERTS + 8) // seats)
        w13 = (torch.randn(e_local, 2 * MOE_I, HIDDEN) * HIDDEN**-0.5).to(dev, dtype)
        w2 = (torch.randn(e_local, HIDDEN, MOE_I) * MOE_I**-0.5).to(dev, dtype)
        for tokens in (1, 64, 256):
            # every seat sends `tokens` tokens; a token picks top_k of the E experts, so a rank's experts get
            # tokens * top_k * e_local / E rows from each seat, spread at random
            picks = torch.randint(0, EXPERTS, (seats * tokens * TOP_K,))
            counts = torch.bincount(picks[picks < e_local], minlength=e_local).to(torch.int32).to(dev)
            x = torch.randn(e_local, seats * tmax, HIDDEN).to(dev, dtype)
            bound = seats * tokens * min(TOP_K, e_local)
            out = swiglu_experts_batched_triton(x, counts, w13, w2, rows_hint=tokens * TOP_K, max_rows=bound)
            full = swiglu_experts_batched_triton(x, counts, w13, w2, rows_hint=tokens * TOP_K)
            same = all(torch.equal(out[e, :n], full[e, :n]) for e, n in enumerate(counts.tolist()))
            t_bounded, _ = gpu_us(lambda: swiglu_experts_batched_triton(x, counts, w13, w2, rows_hint=tokens * TOP_K,
                                                                        max_rows=bound), reps)
            t_full, _ = gpu_us(lambda: swiglu_experts_batched_triton(x, counts, w13, w2,
                                                                     rows_hint=tokens * TOP_K), reps)
            results.append(dict(kernel="moe-batched", case=f"ep{seats}-tokens{tokens}", dtype=str(dtype),
                                experts_local=e_local, rows=int(counts.sum()), rows_bound=bound, triton_us=t_bounded,
                                unbounded_us=t_full, same_as_unbounded=same))


def bench_linear(results, reps, sweep, dtype):
    import torch.nn.functional as F

    from eep_hpc.bench.roofline import measure_bandwidth
    from eep_hpc.kernels.triton_linear import pick_config, skinny_linear_triton

    dev = torch.device("cuda")
    bw = measure_bandwidth()  # GB/s = bytes per us / 1e3
    for name, N, K in LINEAR_CASES:
        copies = max(2, min(INNER, -(-160 * 2**20 // (N * K * dtype.itemsize))))  # > 3x L2 in flight
        base = (torch.randn(N, K) * K**-0.5).to(dev, dtype)  # the CPU's generator (see bench_moe); copies by roll
        ws = [base] + [base.roll(i, 0) for i in range(1, copies)]
        for M in (1, 4, 16):
            x = torch.randn(M, K).to(dev, dtype)
            turn = [0]

            def nxt():
                turn[0] += 1
                return ws[turn[0] % copies]

            ref = F.linear(x.double(), ws[0].double())
            out = skinny_linear_triton(x, ws[0])
            cfg = pick_config(M, N, K, dtype, dev)
            bytes_ = N * K * dtype.itemsize + (M * K + M * N) * dtype.itemsize
            row = dict(kernel="linear", case=f"{name}-{M}", dtype=str(dtype), M=M, N=N, K=K, config=str(cfg),
                       rel_err=rel(out, ref), torch_rel_err=rel(F.linear(x, ws[0]), ref), bytes=bytes_,
                       floor_us=bytes_ / (bw * 1e3), copies=copies)
            t_gpu, _ = gpu_us(lambda: skinny_linear_triton(x, nxt()), reps)
            r_gpu, _ = gpu_us(lambda: F.linear(x, nxt()), reps)
            row.update(triton_us=t_gpu, torch_us=r_gpu, triton_eager_us=eager_us(lambda: skinny_linear_triton(x, nxt()), reps),
                       torch_eager_us=eager_us(lambda: F.linear(x, nxt()), reps),
                       pct_of_copy_bw=None if t_gpu is None else round(100 * row["floor_us"] / t_gpu, 1),
                       torch_pct_of_copy_bw=None if r_gpu is None else round(100 * row["floor_us"] / r_gpu, 1))
            # a graph replay gives the eager result (no host-side state in the kernel)
            g_out = gpu_us(lambda: skinny_linear_triton(x, ws[0]), 3)[1]
            row["graph_matches_eager"] = None if g_out is None else bool(torch.equal(g_out, out))
            if sweep and name in ("qkv_proj", "o_proj") and M in (1, 16):
                times = {str(c): gpu_us(lambda c=c: skinny_linear_triton(x, nxt(), config=c), reps)[0]
                         for c in _linear_sweep_configs(M)}
                row["sweep"] = times
                best = min((t, c) for c, t in times.items() if t is not None)
                row["sweep_best"] = {"config": best[1], "us": best[0],
                                     "pct_of_copy_bw": round(100 * row["floor_us"] / best[0], 1)}
            results.append(row)
            print({k: v for k, v in row.items() if k != "sweep"}, flush=True)
        del ws, base
        torch.cuda.empty_cache()


def _decode_meta(seq_lens, qlens, dev):
    tables, slots, nxt = [], [], 0
    for L, q in zip(seq_lens, qlens):
        nb = (L + PAGE - 1) // PAGE
        t = torch.randperm(nb).add(nxt).tolist()  # scattered blocks
        nxt += nb
        tables.append(t)
        slots += [t[p // PAGE] * PAGE + p % PAGE for p in range(L - q, L)]
    return AttentionMetadata.build(slots, qlens, seq_lens, tables, PAGE, dev), nxt


def bench_attention(results, reps, sweep, dtype):
    from eep_hpc.kernels.triton_attention import AttentionConfig, paged_attention_triton, pick_config, write_kv_triton

    dev = torch.device("cuda")
    cases = [("decode-1-ctx320", [321], [1]), ("decode-1-ctx1024", [1024], [1]), ("decode-1-ctx8192", [8192], [1]),
             ("decode-16-ctx2048", [2048] * 16, [1] * 16),
             ("decode-64-ctx1024", [1024] * 64, [1] * 64), ("decode-256-ctx1024", [1024] * 256, [1] * 256),
             ("prefill-512", [512], [512]), ("prefill-8x1024", [1024] * 8, [1024] * 8),
             ("prefill-4x128+60dec", [128] * 4 + [1024] * 60, [128] * 4 + [1] * 60)]
    for name, seq_lens, qlens in cases:
        meta, nb = _decode_meta(seq_lens, qlens, dev)
        T = sum(qlens)
        k_cache = torch.randn(nb, PAGE, HKV, HEAD_D, device=dev).to(dtype)
        v_cache = torch.randn(nb, PAGE, HKV, HEAD_D, device=dev).to(dtype)
        q = torch.randn(T, HQ, HEAD_D, device=dev).to(dtype)
        k, v = torch.randn(T, HKV, HEAD_D, device=dev).to(dtype), torch.randn(T, HKV, HEAD_D, device=dev).to(dtype)
        scale = HEAD_D**-0.5
        write_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping)
        _ = meta.reference  # the reference's padded index is built once per step, outside the timing
        ref = paged_attention_reference(q.double(), k_cache.double(), v_cache.double(), meta, scale)
        out = paged_attention_triton(q, k_cache, v_cache, meta, scale)
        kv_bytes = sum(seq_lens) * HKV * HEAD_D * 2 * k_cache.element_size()
        cfg = pick_config(meta.max_query_len, meta.num_seqs, HKV, HQ // HKV, HEAD_D, dtype, dev)
        row = dict(kernel="attention", case=name, dtype=str(dtype), T=T, config=str(cfg), rel_err=rel(out, ref),
                   bytes=kv_bytes, floor_us=kv_bytes / 3.0e6,
                   write_kv_triton_us=gpu_us(lambda: write_kv_triton(k, v, k_cache, v_cache, meta.slot_mapping), reps)[0],
                   write_kv_torch_us=gpu_us(lambda: write_kv(k, v, k_cache, v_cache, meta.slot_mapping), reps)[0])
        timings(row, lambda: paged_attention_triton(q, k_cache, v_cache, meta, scale),
                lambda: paged_attention_reference(q, k_cache, v_cache, meta, scale), reps, reps, out)
        if meta.max_query_len == 1 and cfg.NUM_SEGMENTS > 1:  # before/after of the live segments, same process
            legacy = AttentionConfig(cfg.BLOCK_M, cfg.TILE_N, cfg.NUM_SEGMENTS, cfg.num_warps, cfg.num_stages, 0)
            row["all_segments_us"] = gpu_us(
                lambda: paged_attention_triton(q, k_cache, v_cache, meta, scale, config=legacy), reps)[0]
        causal_pairs = sum(qn * (L - qn) + qn * (qn + 1) // 2 for L, qn in zip(seq_lens, qlens))
        row["tflops"] = 4 * causal_pairs * HQ * HEAD_D / (row["triton_us"] * 1e6)
        if sweep:
            decode = meta.max_query_len == 1
            configs = ([AttentionConfig(16, t, s, w, st) for t in (64, 128) for s in (1, 2, 4, 16, 32)
                        for w, st in ((4, 2), (4, 3), (8, 2))]  # parts of at least 2 tiles (the default), and:
                       + [AttentionConfig(16, t, s, 4, 2, mt) for t in (64, 128) for s in (4, 16, 32) for mt in (1, 4)]
                       if decode else
                       [AttentionConfig(m, t, 1, w, st) for m in (64, 128) for t in (32, 64) for w in (4, 8) for st in (2, 3)])
            row["sweep"] = {str(c): gpu_us(lambda c=c: paged_attention_triton(q, k_cache, v_cache, meta, scale, config=c), reps)[0]
                            for c in configs}
        results.append(row)
        print(row, flush=True)


def bench_norm(results, reps, dtype):
    from eep_hpc.kernels.triton_norm import add_rms_norm_triton, rms_norm_triton

    dev = torch.device("cuda")
    for shape in [(1, HIDDEN), (64, HIDDEN), (256, HIDDEN), (512, HIDDEN), (512, HQ, HEAD_D)]:
        x = torch.randn(shape, device=dev).to(dtype)
        r = torch.randn(shape, device=dev).to(dtype)
        w = (1 + 0.1 * torch.randn(shape[-1], device=dev)).to(dtype)
        out = rms_norm_triton(x, w, 1e-6)
        row = dict(kernel="rms_norm", case=str(shape), dtype=str(dtype),
                   rel_err=rel(out, rms_norm_reference(x.double(), w.double(), 1e-6)),
                   add_triton_us=gpu_us(lambda: add_rms_norm_triton(x, r, w, 1e-6), reps)[0],
                   add_torch_us=gpu_us(lambda: rms_norm_reference(x + r, w, 1e-6), reps)[0])
        timings(row, lambda: rms_norm_triton(x, w, 1e-6), lambda: rms_norm_reference(x, w, 1e-6), reps, reps, out)
        results.append(row)
        print(row, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=None)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--only", default="moe,moe_fp8,attention,norm,linear")
    args = p.parse_args()
    torch.manual_seed(0)
    results = []
    only = args.only.split(",")
    dtype = torch.bfloat16
    sections = dict(norm=lambda: bench_norm(results, args.reps, dtype),
                    attention=lambda: bench_attention(results, args.reps, args.sweep, dtype),
                    moe=lambda: bench_moe(results, args.reps, args.sweep, dtype),
                    moe_fp8=lambda: bench_moe(results, args.reps, args.sweep, dtype, fp8=True),
                    moe_batched=lambda: bench_moe_batched(results, args.reps, dtype),
                    linear=lambda: bench_linear(results, args.reps, args.sweep, dtype))
    for name in only:
        try:
            sections[name]()
        except Exception:  # one broken section must not hide the others' numbers
            traceback.print_exc()
            results.append(dict(kernel=name, case="FAILED"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, results=results), f, indent=1)
    f = lambda v: float("nan") if v is None else v  # noqa: E731
    print("\nus per call: device time (graph replay of 10 calls) and eager (one call, host launch cost included)")
    print(f"{'kernel':10} {'case':22} {'triton':>8} {'torch':>8} {'floor':>7} {'tri eager':>9} {'torch eager':>11} {'rel err':>8}")
    for r in results:
        print(f"{r['kernel']:10} {r['case']:22} {f(r.get('triton_us')):8.1f} {f(r.get('torch_us')):8.1f} "
              f"{f(r.get('floor_us')):7.1f} {f(r.get('triton_eager_us')):9.1f} {f(r.get('torch_eager_us')):11.1f} "
              f"{f(r.get('rel_err')):8.1e}")
    for r in results:  # the before/after and tuning lines
        if r.get("all_segments_us") is not None:
            print(f"attention {r['case']}: live segments {f(r.get('triton_us')):.1f} us, every segment (before) "
                  f"{r['all_segments_us']:.1f} us")
        if r.get("tflops") is not None:
            print(f"attention {r['case']}: {f(r.get('triton_us')):.1f} us, {r['tflops']:.0f} TFLOP/s")
        if r["kernel"] == "moe-batched":
            print(f"moe-batched {r['case']:16} {r['rows']:5d} rows: grid to the rows' bound "
                  f"{f(r['triton_us']):7.1f} us, to every expert's capacity {f(r['unbounded_us']):7.1f} us, "
                  f"same outputs {r['same_as_unbounded']}")
        if r["kernel"] == "linear":
            print(f"linear {r['case']:18} triton {f(r.get('pct_of_copy_bw')):5.1f}% of copy bw, cuBLAS "
                  f"{f(r.get('torch_pct_of_copy_bw')):5.1f}%  {r['config']}"
                  + (f"  sweep best {r['sweep_best']}" if "sweep_best" in r else ""))


if __name__ == "__main__":
    main()
