"""What a step trace (engine.step_trace) says: where a rank's time went, by kind of step, and how fast its prefill
ran against the GPU's compute roofline.

    python -m eep_hpc.bench.trace_report TRACE_DIR [--model-dir DIR --prompt-len N --tflops T] [--first N]

Kinds: "graph" (a decode step replayed as a CUDA graph), "mixed" (a step with prefill chunks replayed as a mixed
graph), "eager" (anything else: prefill and mixed steps above the mixed graphs, a decode batch too big for the
graphs). Prefill throughput counts the tokens of eager steps over their time, so the decode tokens
that ride along in a mixed step count too (one each; a prefill step of 64 prompts of 1,024 carries at most 64).
--first N prints the first N steps of each rank as written (a burst's first tokens on a fresh head)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# dense tensor-core peaks (TFLOP/s, no sparsity) by device name, for --tflops' default
PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp8": 1979.0}, "H200": {"bf16": 989.0, "fp8": 1979.0}}


def read_trace(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize(records: list[dict]) -> dict:
    steps = [r for r in records if r["event"] == "step"]
    out = {}
    kinds = (("graph", [s for s in steps if s["graph"] and not s.get("mixed")]),
             ("mixed", [s for s in steps if s["graph"] and s.get("mixed")]),
             ("eager", [s for s in steps if not s["graph"]]))
    for kind, rows in kinds:
        ms = sum(s["step_ms"] for s in rows)
        tokens = sum(s["tokens"] for s in rows)
        out[kind] = {"steps": len(rows), "seconds": round(ms / 1e3, 3), "tokens": tokens,
                     "tokens_per_s": round(tokens / (ms / 1e3), 1) if ms else 0.0,
                     "longest_ms": max((s["step_ms"] for s in rows), default=0.0)}
    out["agree_seconds"] = round(sum(s["agree_ms"] for s in steps) / 1e3, 3)
    out["requests"] = sum(1 for r in records if r["event"] == "add")
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace_dir")
    p.add_argument("--model-dir", help="config.json's directory: adds the prefill compute roofline")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt length the roofline assumes")
    p.add_argument("--tflops", type=float, default=PEAK_TFLOPS["H100"]["bf16"],
                   help="dense peak of the GPU in TFLOP/s (default: H100/H200 bf16, %(default)s)")
    p.add_argument("--first", type=int, default=0, help="print the first N steps of each rank")
    args = p.parse_args(argv)
    report = {}
    for path in sorted(Path(args.trace_dir).glob("rank-*.jsonl")):
        records = read_trace(path)
        summary = summarize(records)
        if args.model_dir:
            from eep_hpc.bench.roofline import prefill_flops_per_token
            from eep_hpc.model.arch import load_arch

            flops = prefill_flops_per_token(load_arch(args.model_dir), args.prompt_len)
            ceiling = args.tflops * 1e12 / flops
            summary["prefill_roofline"] = {"gflop_per_token": round(flops / 1e9, 3), "tflops": args.tflops,
                                           "ceiling_tokens_per_s": round(ceiling, 1),
                                           "fraction": round(summary["eager"]["tokens_per_s"] / ceiling, 3)}
        report[path.stem] = summary
        if args.first:
            t0 = records[0]["t"] if records else 0.0
            for r in [r for r in records if r["event"] == "step"][: args.first]:
                print(f"{path.stem} +{r['t'] - t0:8.3f} s  {r['step_ms']:8.1f} ms  graph {r['graph']:3d}  "
                      f"tokens {r['tokens']:5d}  seqs {r['seqs']:3d}  waiting {r['waiting']}")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
