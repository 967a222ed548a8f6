"""The peer: Hugging Face transformers serving the same architecture with random weights, same prompt/output lengths.

transformers has no server or continuous batching, so its "workload" is static batches through `generate` (greedy,
exactly `--output-len` new tokens, random token-id prompts of `--input-len`). Per batch size it reports output tok/s
and the mean decode step (time after the first token / (output_len - 1)), in the keys eep-hpc's results use.

    python -m eep_hpc.bench.hf_peer configs/models/qwen3-30b-a3b --batch 1 64 --input-len 128 --output-len 128 \
        --out results/hf-peer.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from eep_hpc.bench.report import device_name


def load_model(model_dir: str, dtype: torch.dtype, experts: str):
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    kwargs = {"dtype": dtype}
    if experts:
        kwargs["experts_implementation"] = experts
    with torch.device("cuda"):
        try:
            model = AutoModelForCausalLM.from_config(config, **kwargs)
        except (TypeError, ValueError) as e:  # an older transformers without this experts backend
            print(f"experts_implementation={experts!r} not available ({e}); using the default", flush=True)
            kwargs.pop("experts_implementation", None)
            model = AutoModelForCausalLM.from_config(config, **kwargs)
    impl = getattr(model.config, "_experts_implementation", None) or "default"
    return model.eval(), transformers.__version__, impl


@torch.inference_mode()
def run_batch(model, batch: int, input_len: int, output_len: int, vocab: int, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, input_len), generator=g).cuda()
    mask = torch.ones_like(ids)
    common = dict(attention_mask=mask, do_sample=False, pad_token_id=0, eos_token_id=None)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **common)
    torch.cuda.synchronize()
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **common)
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    generated = (out.shape[1] - input_len) * batch
    step = (total - ttft) / max(1, output_len - 1)
    return {"batch": batch, "input_len": input_len, "output_len": output_len, "completed": batch,
            "total_output_tokens": generated, "duration": total, "output_throughput": generated / total,
            "mean_ttft_ms": ttft * 1000, "mean_tpot_ms": step * 1000}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--experts-implementation", default="grouped_mm",
                   help="transformers' experts backend ('eager' loops over experts; '' = the library default)")
    p.add_argument("--out", default="results/hf-peer.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    t0 = time.monotonic()
    model, version, impl = load_model(args.model_dir, getattr(torch, args.dtype), args.experts_implementation)
    load_s = time.monotonic() - t0
    vocab = model.config.vocab_size
    run_batch(model, 1, 16, 4, vocab, seed=99)  # warm-up (kernels, allocator)
    runs = []
    for b in args.batch:
        r = run_batch(model, b, args.input_len, args.output_len, vocab, seed=b)
        print(json.dumps(r), flush=True)
        runs.append(r)
    result = {"engine": f"transformers {version}", "model": Path(args.model_dir).name, "dtype": args.dtype,
              "experts_implementation": impl, "device": device_name(),
              "num_gpus": 1, "load_s": load_s, "runs": runs, "command": shlex.join([sys.executable, "-m",
                                                                                   "eep_hpc.bench.hf_peer", *sys.argv[1:]])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
