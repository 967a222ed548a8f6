"""Stopping `eep-hpc serve` (Ctrl-C, or SIGTERM as `scancel` sends it) drains: new requests get a 503 at once,
requests in flight have serve.shutdown_grace_s to finish, then each open stream gets an error event and [DONE] and
each waiting non-streaming request a 503; no traceback, and the head and every rank are gone soon after."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys

import httpx
import pytest

from support import alive, job_pid, until, wait_gone

GRACE_S = 2.0
MODEL = "eep-tiny-moe"
LONG = 2000  # tokens: far more than the grace period lets a CPU rank make (about 70 tokens/s here)
SHORT = 48


def start_serve(run_dir, grace_s: float) -> tuple[subprocess.Popen, str, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "eep_hpc.cli", "serve", "--port", "0", "--ranks", "2", "--device", "cpu",
         "--run-dir", str(run_dir), "--set", f"serve.shutdown_grace_s={grace_s}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
        start_new_session=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if m := re.search(r"at (http://\S+)", line):
            return proc, m.group(1), lines
    raise AssertionError("serve did not start:\n" + "".join(lines))


def assert_503(r: httpx.Response) -> None:
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["type"] == "ServiceUnavailableError" and err["code"] == 503 and err["message"], err


@pytest.mark.parametrize("signals, grace_s", [
    ([signal.SIGINT], GRACE_S),
    ([signal.SIGTERM], GRACE_S),
    ([signal.SIGINT, signal.SIGINT], 600),  # a second Ctrl-C ends the grace period at once
], ids=["ctrl-c", "sigterm", "ctrl-c-twice"])
def test_stop_drains_open_streams_then_ends_them_with_an_error_event(tmp_path, signals, grace_s):
    proc, url, lines = start_serve(tmp_path, grace_s)
    ranks = httpx.get(f"{url}/admin/state", timeout=30).json()["ranks"]
    pids = [r["pid"] for r in ranks] + [job_pid(r) for r in ranks]  # the ranks and submitit's job processes
    assert len(pids) == 4 and all(alive(p) for p in pids)

    async def stream(client, max_tokens: int, events: list[str], started: asyncio.Event) -> list[str]:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[len("data: "):])
                    started.set()
        return events

    def in_flight() -> int:
        return httpx.get(f"{url}/admin/state", timeout=30).json()["requests_in_flight"]

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            long_started, short_started = asyncio.Event(), asyncio.Event()
            long = asyncio.create_task(stream(client, LONG, [], long_started))
            whole = asyncio.create_task(client.post(f"{url}/v1/completions", json={
                "model": MODEL, "prompt": "Hello", "max_tokens": LONG, "ignore_eos": True}))
            await long_started.wait()
            await until(lambda: in_flight() == 2, 30, "both long requests admitted")
            short_events: list[str] = []
            short = asyncio.create_task(stream(client, SHORT, short_events, short_started))
            await short_started.wait()
            for i, sig in enumerate(signals):
                if sig == signal.SIGINT:
                    os.killpg(proc.pid, sig)  # Ctrl-C in a terminal reaches the whole process group
                else:
                    os.kill(proc.pid, sig)
                if i == 0:
                    assert short_events[-1] != "[DONE]", "the short request was not in flight at the signal"
                    # the head is draining (the long requests keep it so): a new request is refused at once
                    assert_503(await client.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi"}))
                    await short  # and the short one finishes meanwhile
            return await long, await short, await whole

    long, short, whole = asyncio.run(main())
    out, _ = proc.communicate(timeout=GRACE_S + 15)  # the head is gone within the grace and a few seconds
    log = "".join(lines) + out
    # in flight and done within the grace: it ends as usual
    assert short[-1] == "[DONE]" and json.loads(short[-2])["choices"][0]["finish_reason"] == "length", short[-3:]
    assert not any("error" in json.loads(e) for e in short[:-1])
    # still open after the grace: an OpenAI-shaped error event, then [DONE]
    assert long[-1] == "[DONE]", long[-3:]
    err = json.loads(long[-2])["error"]
    assert err["code"] == 503 and "shutting down" in err["message"], err
    assert len(long) < LONG  # it was cut short
    assert_503(whole)
    assert proc.returncode == 0, log
    assert "Traceback" not in log and "eep-hpc stopped" in log, log
    asyncio.run(wait_gone(pids, 5, "ranks after the head exited"))
