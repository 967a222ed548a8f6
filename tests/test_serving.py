"""What a user of `eep-hpc serve` sees beyond single requests: batching does not change greedy text, idle ranks
do not burn a core, Ctrl-C leaves no process behind, and dummy weights serve big architectures' shapes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch

from eep_hpc.config import ModelConfig
from eep_hpc.model.arch import load_arch
from eep_hpc.model.loader import build_model
from streaming_load import PROMPTS, reference_texts, stream_completion


def test_sixteen_concurrent_streams_match_one_at_a_time(api):
    async def one_at_a_time():
        async with httpx.AsyncClient(timeout=120) as client:
            return [await stream_completion(client, api.url, api.model, p, 24) for p in PROMPTS]

    alone = asyncio.run(one_at_a_time())
    together = asyncio.run(reference_texts(api.url, api.model, 24))  # all 16 at once, batched
    assert len(PROMPTS) == 16
    assert together == alone


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_idle_rank_does_not_spin(api):
    asyncio.run(reference_texts(api.url, api.model, 4))  # it has served, and is idle again
    pid = api.state()["ranks"][0]["pid"]
    before = cpu_seconds(pid)
    time.sleep(3.0)
    used = cpu_seconds(pid) - before
    assert used < 0.3, f"an idle rank used {used:.2f} s of CPU in 3 s"


def test_serve_cli_prints_url_and_stops_cleanly_on_ctrl_c(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "eep_hpc.cli", "serve", "--port", "0", "--ranks", "2", "--device", "cpu",
         "--run-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True)
    url, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        m = re.search(r"at (http://\S+)", line)
        if m:
            url = m.group(1)
            break
    assert url, "".join(lines)
    r = httpx.post(f"{url}/v1/completions", json={"model": "eep-tiny-moe", "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200
    info = json.loads((tmp_path / "head.json").read_text())
    assert info["api_url"] == url and oct((tmp_path / "head.json").stat().st_mode & 0o777) == "0o600"
    pids = [r["pid"] for r in httpx.get(f"{url}/admin/state").json()["ranks"]]
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal reaches the whole process group
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert "eep-hpc stopped" in out
    assert "Traceback" not in out
    assert not (tmp_path / "head.json").exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/status").read_text().split("State:")[1][:3]


def test_serve_cli_names_a_bad_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nblock_sise = 16\n")
    r = subprocess.run([sys.executable, "-m", "eep_hpc.cli", "serve", "--config", str(bad)], capture_output=True, text=True)
    assert r.returncode == 2
    assert "block_sise" in r.stderr


def test_dummy_weights_build_a_model_of_the_config_shape(tmp_path):
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "moe_intermediate_size": 32,
           "num_experts": 16, "num_experts_per_tok": 4, "max_position_embeddings": 256, "norm_topk_prob": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))  # no weights at all: load_format = "dummy"
    arch = load_arch(tmp_path)
    mcfg = ModelConfig(path=str(tmp_path), load_format="dummy")
    a = build_model(arch, mcfg, tmp_path, [[0, 1, 2, 3]] * 2, 256, torch.device("cpu"), torch.float32)
    b = build_model(arch, mcfg, tmp_path, [[2, 3, 9, 15]] * 2, 256, torch.device("cpu"), torch.float32)
    assert a.layers[0].mlp.w13.shape == (4, 64, 64)
    # experts are seeded by name: expert 2 is the same tensor wherever a rank holds it
    assert torch.equal(a.layers[1].mlp.w13[2], b.layers[1].mlp.w13[0])
    assert torch.equal(a.embed_tokens.weight, b.embed_tokens.weight)
    assert a.embed_tokens.weight.std() > 0
