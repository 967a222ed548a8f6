"""The step-trace report: time and tokens by kind of step, and the prefill FLOPs it compares against."""

from __future__ import annotations

import json

from eep_hpc.bench import trace_report
from eep_hpc.bench.roofline import prefill_flops_per_token
from eep_hpc.model.arch import load_arch


def step(t, ms, graph, tokens, agree=0.5, mixed=False):
    return {"t": t, "event": "step", "agree_ms": agree, "step_ms": ms, "graph": graph, "mixed": mixed,
            "tokens": tokens, "seqs": 1, "waiting": 0}


def test_summary_splits_graph_mixed_and_eager_steps(tmp_path, capsys):
    records = [{"t": 0.0, "event": "add", "request_id": "a", "tokens": 100}, step(0.1, 100.0, 0, 1000),
               step(0.2, 10.0, 4, 4), step(0.3, 10.0, 4, 4), step(0.4, 300.0, 0, 2000),
               step(0.5, 20.0, 256, 200, mixed=True)]
    (tmp_path / "rank-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    trace_report.main([str(tmp_path)])
    report = json.loads(capsys.readouterr().out)["rank-0"]
    assert report["eager"] == {"steps": 2, "seconds": 0.4, "tokens": 3000, "tokens_per_s": 7500.0, "longest_ms": 300.0}
    assert report["graph"]["steps"] == 2 and report["graph"]["tokens_per_s"] == 400.0
    assert report["mixed"] == {"steps": 1, "seconds": 0.02, "tokens": 200, "tokens_per_s": 10000.0, "longest_ms": 20.0}
    assert report["agree_seconds"] == 0.003 and report["requests"] == 1


def test_prefill_flops_count_weights_twice_and_causal_attention():
    arch = load_arch("configs/models/qwen3-30b-a3b")
    D, L, E, k, I = arch.hidden_size, arch.num_layers, arch.num_experts, arch.top_k, arch.moe_intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    per_layer = D * q + 2 * D * kv + q * D + D * E + k * 3 * I * D  # every layer of Qwen3-30B-A3B is MoE
    one = 2 * (L * per_layer + arch.vocab_size * D) + L * 4 * q * 1  # a 1-token prompt: one key
    assert prefill_flops_per_token(arch, 1) == one
    # 3.3 B active parameters: about 6 GFLOP per token at 1k of context
    assert 5.0e9 < prefill_flops_per_token(arch, 1024) < 7.0e9
