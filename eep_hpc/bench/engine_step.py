"""The whole decode step of one rank's engine on one GPU, as serving runs it: scheduling, the inputs, the CUDA graph,
the LM head, the sampler and the bookkeeping, timed on the host (what a request's TPOT pays on the rank), with
the GPU reads-back (host syncs) each step makes. `step_profile` times the GPU part alone; the difference is host
work the GPU waits for.

    python -m eep_hpc.bench.engine_step --config configs/qwen3-30b-a3b-dummy.toml --batch 1 64 --out FILE

--baseline-env VAR=VALUE ... first measures with those variables set, then without (kernel switches read at each
call, e.g. EEP_HPC_MOE_PAIR_BLOCKS=0); graphs are captured afresh for each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from eep_hpc import protocol as P
from eep_hpc.bench.step_profile import env_set
from eep_hpc.config import load_config
from eep_hpc.engine.rank_engine import build_engine
from eep_hpc.model.arch import load_arch
from eep_hpc.parallel.groups import EpochGroup


def decode_steps(engine, batch: int, prompt_len: int, steps: int, temperature: float, seed: int) -> dict:
    """`batch` requests of `prompt_len` random tokens; after their prefill, `steps` decode steps, each timed."""
    vocab = engine.model.arch.vocab_size
    g = torch.Generator().manual_seed(seed)
    sampling = P.SamplingParams(max_tokens=steps + 2, temperature=temperature, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        engine.add(P.AddRequest(request_id=f"b{batch}-{i}", prompt_token_ids=ids, sampling=sampling))
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running) or \
            engine.scheduler.waiting:
        engine.step()
    times, syncs = [], []
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(steps):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                t0 = time.perf_counter()
                engine.step()
                times.append((time.perf_counter() - t0) * 1000)
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    engine.abort_all()
    ordered = sorted(times)
    return {"batch": batch, "context": prompt_len, "temperature": temperature, "steps": steps,
            "step_ms_median": statistics.median(times), "step_ms_p10": ordered[len(times) // 10],
            "step_ms_p90": ordered[len(times) * 9 // 10], "host_syncs_per_step": statistics.median(syncs)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/qwen3-30b-a3b-dummy.toml")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=320, help="prompt tokens before the timed decode steps")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--temperature", type=float, nargs="+", default=[0.0, 0.8])
    p.add_argument("--baseline-env", nargs="*", default=[], metavar="VAR=VALUE")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    cfg.engine.gpu_memory_utilization = min(cfg.engine.gpu_memory_utilization, 0.8)
    arch = load_arch(cfg.model.path)
    launch = P.RankLaunch(rank_id=0, head_address="", model_dir=cfg.model.path, eos_token_ids=[], device="cuda",
                          config=cfg)
    epoch = P.Epoch(epoch=0, rank_ids=[0], store_host="", store_port=0,
                    physical_to_logical=[list(range(arch.num_experts))] * len(arch.moe_layers),
                    slot_offsets=[0, arch.num_experts])
    engine = build_engine(launch, epoch, EpochGroup(None, 0, 0, 1, torch.device("cuda")))

    def measure(label: str) -> list[dict]:
        engine.runner.graphs.reset()  # captured afresh under the current switches
        engine.runner.graphs.capture_all(engine.ep)
        rows = []
        for b in args.batch:
            for t in args.temperature:
                row = {"run": label, **decode_steps(engine, b, args.context, args.steps, t, seed=b)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        return rows

    rows = []
    if args.baseline_env:
        pairs = dict(kv.split("=", 1) for kv in args.baseline_env)
        with env_set(pairs):
            rows += measure(f"baseline {pairs}")
    rows += measure("now")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": args.config, "device": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
