"""Memory roofline of a decode step: the bytes one step must read, over the GPU's measured copy bandwidth.

A decode step of B sequences reads every dense weight once (attention, router, norms, the LM head), each expert
that at least one of its B·k routed pairs picks, and the K/V of every cached token. With uniform routing the
expected number of distinct experts per layer is E·(1 − (1 − k/E)^B). Compute is far below the memory time at
these sizes (kernels/NOTES.md), so bytes / bandwidth is the floor.

    python -m eep_hpc.bench.roofline CONFIG_JSON_DIR --batch 1 --context 320 [--bandwidth-gbps G | --measure]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass

import torch

from eep_hpc.model.arch import MoEArch, load_arch


@dataclass
class StepBytes:
    batch: int
    context: int
    dense: int  # attention + router + norms + LM head (+ dense MLP layers)
    experts: int  # distinct experts read (expected, uniform routing)
    kv: int  # cached keys/values read
    experts_per_layer: float

    @property
    def total(self) -> int:
        return self.dense + self.experts + self.kv


def step_bytes(arch: MoEArch, batch: int, context: int, weight_bytes: float = 2.0, kv_bytes: float = 2.0,
               num_ranks: int = 1) -> StepBytes:
    """Bytes one rank reads in a decode step of `batch` sequences per rank with `context` cached tokens each.
    With EP over `num_ranks`, a rank holds 1/num_ranks of the experts and receives the pairs routed to them."""
    if arch.mla is not None:
        raise ValueError("the roofline counts GQA attention only (Qwen3-MoE, Mixtral)")
    D, L = arch.hidden_size, arch.num_layers
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    attention = D * q + 2 * D * kv + q * D + 2 * D  # q, k, v, o projections and two norms
    moe_layers = len(arch.moe_layers)
    dense_mlp = (L - moe_layers) * 3 * D * arch.intermediate_size
    dense = L * attention + moe_layers * D * arch.num_experts + dense_mlp + arch.vocab_size * D + D
    E, k = arch.num_experts, arch.top_k
    pairs = batch * num_ranks  # every rank's tokens reach this rank's experts
    distinct = E * (1 - (1 - k / E) ** pairs) / num_ranks
    experts = moe_layers * distinct * 3 * arch.moe_intermediate_size * D
    kv_read = batch * context * L * 2 * kv
    return StepBytes(batch, context, int(dense * weight_bytes), int(experts * weight_bytes), int(kv_read * kv_bytes),
                     distinct)


def prefill_flops_per_token(arch: MoEArch, prompt_len: int) -> float:
    """FLOPs one prompt token costs in a prefill of `prompt_len` tokens: 2 per weight it multiplies (attention
    projections, router, its top-k experts, dense MLP layers; the LM head only for the last token of a prompt) and
    the causal attention itself (QK^T and PV over on average (prompt_len + 1) / 2 keys, every query head)."""
    if arch.mla is not None:
        raise ValueError("the roofline counts GQA attention only (Qwen3-MoE, Mixtral)")
    D, L = arch.hidden_size, arch.num_layers
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    moe_layers = len(arch.moe_layers)
    experts = arch.top_k * 3 * arch.moe_intermediate_size
    weights = (L * (D * q + 2 * D * kv + q * D) + moe_layers * D * (arch.num_experts + experts)
               + (L - moe_layers) * 3 * D * arch.intermediate_size + arch.vocab_size * D / prompt_len)
    attention = L * 2 * 2 * q * (prompt_len + 1) / 2
    return 2 * weights + attention


def measure_bandwidth(device: str = "cuda", gib: float = 2.0, repeats: int = 20) -> float:
    """Copy bandwidth in GB/s, counting read + write, as a large device-to-device copy achieves it."""
    n = int(gib * 2**30) // 4
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    end.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    return 2 * n * 4 / seconds / 1e9


def roofline(arch: MoEArch, batch: int, context: int, bandwidth_gbps: float, **kw) -> dict:
    b = step_bytes(arch, batch, context, **kw)
    floor_ms = b.total / (bandwidth_gbps * 1e9) * 1000
    return {**asdict(b), "total_bytes": b.total, "bandwidth_gbps": bandwidth_gbps, "step_floor_ms": floor_ms,
            "tokens_per_s_ceiling": batch / floor_ms * 1000}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model_dir", help="directory with config.json")
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--context", type=int, default=320, help="cached tokens per sequence (mean over the run)")
    p.add_argument("--weight-bytes", type=float, default=2.0, help="bytes per weight (2 bf16, ~1 fp8)")
    p.add_argument("--num-ranks", type=int, default=1)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--bandwidth-gbps", type=float)
    g.add_argument("--measure", action="store_true", help="measure the copy bandwidth of cuda:0")
    args = p.parse_args(argv)
    arch = load_arch(args.model_dir)
    t0 = time.monotonic()
    bw = measure_bandwidth() if args.measure else args.bandwidth_gbps
    rows = [roofline(arch, b, args.context, bw, weight_bytes=args.weight_bytes, num_ranks=args.num_ranks)
            for b in args.batch]
    print(json.dumps({"measured": args.measure, "seconds": time.monotonic() - t0, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
