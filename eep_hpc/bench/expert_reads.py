"""Expert reads over NIXL, as a scale event does them: one rank publishes its expert slots, another reads some.

    python -m eep_hpc.bench.expert_reads [--layers 24 --slots 64 --reads 256] [--out FILE]

Two processes: on two GPUs, or sharing one GPU (the one-GPU lab), or on the CPU (`--device cpu`, DRAM). Each
variant reads the same experts into fresh staging tensors and checks every byte against the source:
- `batched`: what a rank does (`RankAgent.start_fetch_experts`): READs of up to READ_PIECE_BYTES of expert tensors
  per source, READS_IN_FLIGHT at a time (before 7740d45: one READ per source);
- `per_expert`: one READ per expert, one after the other (what the batching saves);
- `capped`: batched with `--gbps` as the rate cap (`parallel.transfer_gbps`), in pieces.
Writes a JSON report (default: results/<device>/expert-reads.json)."""

from __future__ import annotations

import datetime
import json
import os
import time

import torch

from eep_hpc import signing
from eep_hpc.bench.two_processes import spawn_two
from eep_hpc.parallel.groups import connect_store

EPOCH = 1


def _slots(args, device, seed: int):
    L, S, I, D = args.layers, args.slots, args.intermediate, args.hidden
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = torch.bfloat16
    w13 = [torch.randn(S, 2 * I, D, device=device, generator=gen).to(dtype) for _ in range(L)]
    w2 = [torch.randn(S, D, I, device=device, generator=gen).to(dtype) for _ in range(L)]
    return w13, w2


def _worker(i: int, port: int, args) -> None:
    from eep_hpc.parallel.weight_transfer import RankAgent

    signing.use_secret(b"expert-reads-benchmark-secret!!")
    if args.device == "cuda":
        shared = torch.cuda.device_count() < 2
        device = torch.device("cuda", 0 if shared else i)
        torch.cuda.set_device(device)
    else:
        shared, device = False, torch.device("cpu")
    store = connect_store("127.0.0.1", port, timeout_s=300)
    agent = RankAgent(i, store)
    if i == 0:  # the source: publishes its slots and serves reads until the reader is done
        w13, w2 = _slots(args, device, seed=1)
        agent.publish_experts(EPOCH, w13, w2)
        store.set("ready", "1")
        store.wait(["done"], datetime.timedelta(seconds=600))
        return
    store.wait(["ready"], datetime.timedelta(seconds=300))
    want13, want2 = _slots(args, device, seed=1)  # the same generator: the source's bytes, to check against
    gen = torch.Generator().manual_seed(7)
    picks = [(int(layer), int(slot)) for layer, slot in
             zip(torch.randint(args.layers, (args.reads,), generator=gen), torch.randint(args.slots, (args.reads,), generator=gen))]
    I, D = args.intermediate, args.hidden
    expert_bytes = (2 * I * D + D * I) * 2
    results = []
    for variant in args.variants:
        for rep in range(args.repeats):
            s13 = torch.zeros(args.reads, 2 * I, D, dtype=torch.bfloat16, device=device)
            s2 = torch.zeros(args.reads, D, I, dtype=torch.bfloat16, device=device)
            reg = agent.register([s13, s2])
            reads = [(0, layer, slot, s13[r], s2[r]) for r, (layer, slot) in enumerate(picks)]
            t0 = time.perf_counter()
            if variant == "per_expert":
                for read in reads:
                    pending = agent.start_fetch_experts(EPOCH, [read])
                    pending.wait()
                    pending.close()
            else:
                pending = agent.start_fetch_experts(EPOCH, reads, gbps=args.gbps if variant == "capped" else 0.0)
                polls = 0
                while not pending.done():
                    polls += 1
                    time.sleep(0.0002)
                pending.close()
            seconds = time.perf_counter() - t0
            ok = all(torch.equal(s13[r], want13[layer][slot]) and torch.equal(s2[r], want2[layer][slot])
                     for r, (layer, slot) in enumerate(picks))
            agent.deregister(reg)
            nbytes = args.reads * expert_bytes
            results.append({"variant": variant, "repeat": rep, "experts": args.reads, "bytes": nbytes,
                            "seconds": round(seconds, 5), "gbps": round(nbytes / seconds / 1e9, 3), "bytes_match": ok})
            print(f"{variant:10s} #{rep}: {args.reads} experts, {nbytes / 2**20:.0f} MiB in {seconds * 1e3:.1f} ms = "
                  f"{nbytes / seconds / 1e9:.2f} GB/s, bytes match: {ok}", flush=True)
    store.set("done", "1")
    name = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "CPU"
    report = {"what": "expert slots read over NIXL from a peer process (RankAgent), wall time per read set",
              "command": "python -m eep_hpc.bench.expert_reads " + " ".join(args.argv),
              "device": name, "ranks_share_one_gpu": shared, "progress_delay_us": int(os.environ.get(
                  "EEP_HPC_NIXL_PROGRESS_US", 0)) or "default", "expert_shape": [[2 * I, D], [D, I]],
              "dtype": "bfloat16", "results": results}
    out = args.out or f"results/{name}/expert-reads.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print("wrote", out)
    if not all(r["bytes_match"] for r in results):
        raise SystemExit("some expert read did not match the source's bytes")


def main(argv: list[str] | None = None) -> None:
    import argparse
    import sys


    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--slots", type=int, default=64, help="expert slots per layer on the source")
    ap.add_argument("--hidden", type=int, default=2048)  # Qwen3-30B-A3B
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--reads", type=int, default=256, help="experts to read")
    ap.add_argument("--variants", nargs="+", default=["batched", "per_expert", "capped"],
                    choices=["batched", "per_expert", "capped"])
    ap.add_argument("--gbps", type=float, default=1.0, help="the rate cap of the `capped` variant")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here: use --device cpu")
    spawn_two(__spec__.name, "_worker", args, timeout_s=600)


if __name__ == "__main__":
    main()
