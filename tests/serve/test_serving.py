"""What a user of `eep-hpc serve` sees beyond single requests: batching does not change greedy text, clients that
stall, read slowly or vanish harm no other stream, idle ranks do not burn a core, Ctrl-C leaves no process behind,
and dummy weights serve big architectures' shapes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from eep_hpc.config import ModelConfig
from eep_hpc.model.arch import load_arch
from eep_hpc.model.loader import build_model
from support import PROMPTS, reference_texts, stream_completion
from support import wait_until


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
    wave = api.state()["wave"]
    asyncio.run(reference_texts(api.url, api.model, 4))  # it has served
    # and is idle again: its last wave ended (the rank said so), no request is open
    state = wait_until(lambda: (s := api.state())["wave"] > wave and not s["wave_running"]
                       and s["requests_in_flight"] == 0 and s, 30, "the rank's wave to end")
    pid = state["ranks"][0]["pid"]
    before = cpu_seconds(pid)
    time.sleep(3.0)  # the window measured: an idle rank blocks on its socket, waking only for the heartbeat
    used = cpu_seconds(pid) - before
    assert not api.state()["wave_running"], "a wave started during the window: it measured no idle rank"
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


@pytest.mark.parametrize("item, wanted", [
    ("engine.max_num_seqs=512", ("engine", "max_num_seqs", 512)),
    ("parallel.backend=nixl_ep", ("parallel", "backend", "nixl_ep")),
    ('model.dtype="bfloat16"', ("model", "dtype", "bfloat16")),
    ("engine.cuda_graphs=false", ("engine", "cuda_graphs", False)),
    ("engine.gpu_memory_utilization=0.5", ("engine", "gpu_memory_utilization", 0.5)),
])
def test_serve_set_reads_values_as_toml(item, wanted):
    from eep_hpc.cli import parse_setting

    assert parse_setting(item) == wanted


def test_serve_set_names_what_is_wrong():
    r = subprocess.run([sys.executable, "-m", "eep_hpc.cli", "serve", "--set", "engine.max_num_sqs=8"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "max_num_sqs" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "eep_hpc.cli", "serve", "--set", "max_num_seqs"], capture_output=True,
                       text=True)
    assert r.returncode != 0 and "SECTION.KEY=VALUE" in r.stderr, r.stderr


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


def kv_blocks_in_use(api) -> list[int]:
    return [r["kv_blocks_used"] for r in api.state()["ranks"]]


def aborted_requests(api) -> float:
    """/metrics: engine requests that ended because their client went away."""
    for line in httpx.get(f"{api.url}/metrics").text.splitlines():
        if line.startswith("eep_hpc:request_success_total{") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sse_texts(raw: bytes, n: int) -> list[str]:
    """Text of each choice of a completions SSE body that must end with [DONE] and carry no error event."""
    events = [line[len(b"data: ") :] for line in raw.split(b"\n") if line]
    assert events and events[-1] == b"[DONE]", events[-2:]
    texts = [""] * n
    for e in events[:-1]:
        chunk = json.loads(e)
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            texts[c["index"]] += c["text"]
    return texts


def test_stalled_slow_and_vanishing_clients_leave_other_streams_exact(api):
    """Around 16 greedy streams: a client that stops reading its (multi-megabyte) stream and later reads it slowly,
    clients that disconnect mid-stream, mid-body and while waiting for a whole answer. The 16 streams finish, with
    exactly the text they have alone, while the stalled client has still read nothing; it then gets its whole
    stream, exact; and every KV block comes back."""
    url, model = api.url, api.model
    # echo + 20 logprobs of a ~1000-token prompt, 6 times: more than the kernel's socket buffers hold, so the
    # server's writes to this client block until it reads.
    big = {"model": model, "prompt": "x " * 1000, "max_tokens": 4, "echo": True, "logprobs": 20, "n": 6,
           "temperature": 0}  # fmt: skip
    # Long enough that only an abort frees their blocks within the test's wait below.
    max_model_len = httpx.get(f"{url}/v1/models").json()["data"][0]["max_model_len"]
    long_stream = {"model": model, "prompt": "Go on and on:", "max_tokens": max_model_len - 32, "ignore_eos": True,
                   "stream": True}  # fmt: skip

    async def vanish_mid_stream(client: httpx.AsyncClient) -> None:
        async with client.stream("POST", f"{url}/v1/completions", json=long_stream) as r:
            assert r.status_code == 200
            events = 0
            async for line in r.aiter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    return  # closes the connection

    async def vanish_mid_body() -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n" + b'{"prompt": "a')
        await writer.drain()
        await asyncio.sleep(0.5)
        writer.close()

    async def vanish_waiting(client: httpx.AsyncClient) -> None:
        body = {**long_stream, "stream": False}
        with pytest.raises(httpx.ReadTimeout):
            await client.post(f"{url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=1.0))

    async def scenario():
        alone = await reference_texts(url, model, 32)
        async with httpx.AsyncClient(timeout=120) as client:
            # Its text, the cheap way: every greedy choice is the echoed prompt and the same completion.
            r = await client.post(f"{url}/v1/completions", json={**big, "n": 1, "logprobs": None})
            assert r.status_code == 200, r.text
            big_texts = [r.json()["choices"][0]["text"]] * big["n"]
            # A fixed, small receive buffer: the client's kernel takes no more than this while the client stalls.
            small = httpx.AsyncHTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)])
            async with (
                httpx.AsyncClient(transport=small, timeout=120) as slow_client,
                slow_client.stream("POST", f"{url}/v1/completions", json={**big, "stream": True}) as slow,
            ):
                assert slow.status_code == 200
                pieces = slow.aiter_raw()
                received = [await anext(pieces)]
                together, *_ = await asyncio.gather(
                    reference_texts(url, model, 32),
                    *[vanish_mid_stream(client) for _ in range(3)],
                    vanish_mid_body(),
                    vanish_waiting(client),
                )
                async for piece in pieces:  # now read, slowly
                    received.append(piece)
                    await asyncio.sleep(0.005)
        return alone, together, big_texts, b"".join(received)

    aborted = aborted_requests(api)
    alone, together, big_texts, slow_body = asyncio.run(scenario())
    assert together == alone
    assert len(slow_body) > 4 * 2**20  # it did not fit in the socket buffers
    assert sse_texts(slow_body, 6) == big_texts
    end = time.monotonic() + 10  # the vanished requests would need ~2000 more decode steps to finish on their own
    while (any(kv_blocks_in_use(api)) or aborted_requests(api) < aborted + 4) and time.monotonic() < end:
        time.sleep(0.1)
    assert not any(kv_blocks_in_use(api)), "the disconnected requests still hold KV blocks"
    assert aborted_requests(api) == aborted + 4  # 3 mid-stream, 1 waiting (the one mid-body never started)
