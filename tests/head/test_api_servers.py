"""serve.api_servers = 2: the head and one more API process on one port (SO_REUSEPORT), the second streaming its
requests' tokens straight from the ranks while the head's coordinator alone routes, scales and recovers.

The head runs as `eep-hpc serve` in a process of its own (as users run it): a kill -9 of a rank, and
prometheus_client's multiprocess mode, stay out of the test process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from support import PROMPTS, alive, reference_texts, run_load, until, wait_until

MAX_TOKENS = 24
API_KEY = "sk-test-api-servers"


class ServeProcess:
    """`eep-hpc serve` with two API processes and an API key (so /admin/* gets a random token)."""

    def __init__(self, run_dir: Path, ranks: int, sets: list[str] = ()):
        self.run_dir = run_dir
        cmd = [sys.executable, "-m", "eep_hpc.cli", "serve", "--port", "0", "--ranks", str(ranks), "--run-dir",
               str(run_dir), "--set", "serve.api_servers=2", "--set", f'serve.api_key="{API_KEY}"',
               "--set", "control.rank_timeout_s=10"]
        for item in sets:
            cmd += ["--set", item]
        self.log = run_dir.parent / "serve.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_until(lambda: (run_dir / "head.json").is_file() or self.proc.poll() is not None, 300,
                   "the head to start")
        assert self.proc.poll() is None, self.log.read_text()[-3000:]
        info = json.loads((run_dir / "head.json").read_text())
        self.url, self.model = info["api_url"], info["model"]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.admin = {"Authorization": f"Bearer {Path(info['admin_token_file']).read_text().strip()}"}
        self.user = {"Authorization": f"Bearer {API_KEY}"}
        self.api_pid = wait_until(self._api_process, 30, "the second API process")

    def _api_process(self) -> int | None:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in map(int, children):
            if "eep_hpc.serve.api_process" in Path(f"/proc/{pid}/cmdline").read_text():
                return pid
        return None

    def state(self) -> dict:
        r = httpx.get(f"{self.url}/admin/state", headers=self.admin, timeout=30)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def connections_of(pid: int, port: int) -> int:
    """Established TCP connections that process `pid` accepted on `port`."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01" and f[9] in inodes:
                count += 1
    return count


async def admin_post(head: ServeProcess, path: str, body: dict) -> dict:
    async with httpx.AsyncClient(timeout=300, headers=head.admin) as client:
        r = await client.post(f"{head.url}{path}", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def test_grow_shrink_and_kill9_with_two_api_processes(tmp_path):
    head = ServeProcess(tmp_path / "run", ranks=2)
    try:
        reference = asyncio.run(reference_texts(head.url, head.model, MAX_TOKENS, headers=head.user))

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(head.url, head.model, MAX_TOKENS, stop, streams=16,
                                                headers=head.user))
            # the kernel spread the 16 clients' connections over both processes
            await until(lambda: connections_of(head.api_pid, head.port) > 0, 30,
                        "the second API process to take connections")
            await asyncio.sleep(0.5)
            grown = await admin_post(head, "/admin/scale/grow", {"n": 1})
            await asyncio.sleep(0.5)
            shrunk = await admin_post(head, "/admin/scale/shrink", {"n": 1})
            await asyncio.sleep(0.5)
            before = head.state()
            victim = before["members"][0]
            os.kill(next(r["pid"] for r in before["ranks"] if r["rank_id"] == victim), signal.SIGKILL)
            recovered = await until(lambda: next((e for e in head.state()["scale_events"]
                                                  if e["kind"] == "recover" and e["phase"] == "DONE"), None),
                                    120, "the recovery")
            await asyncio.sleep(1.0)
            stop.set()
            return await load, grown, shrunk, recovered, victim

        result, grown, shrunk, recovered, victim = asyncio.run(scenario())
        assert result.failures == [], result.failures[:5]
        assert result.completed >= 32
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
        assert (grown["phase"], grown["from_ranks"], grown["to_ranks"]) == ("DONE", 2, 3)
        assert (shrunk["phase"], shrunk["from_ranks"], shrunk["to_ranks"]) == ("DONE", 3, 2)
        assert recovered["requests_migrated"] > 0
        assert victim not in head.state()["members"] and len(head.state()["members"]) == 1

        # /metrics (whichever process a scrape reaches) sums every API process's and adds the cluster's
        for _ in range(4):
            with httpx.Client(timeout=30) as fresh:  # a new connection each: either process
                text = fresh.get(f"{head.url}/metrics").text
            done = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("eep_hpc:request_success_total{") and 'finished_reason="length"' in line)
            assert done == result.completed + len(PROMPTS)  # the load and the reference
            assert 'eep_hpc:scale_events_total{kind="grow",result="done"} 1.0' in text
    finally:
        head.stop()
    assert head.proc.returncode == 0, head.log.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while alive(head.api_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(head.api_pid), "the second API process outlived the head"


def test_a_lost_api_process_leaves_the_others_serving(tmp_path):
    """kill -9 of the second API process while 12 long streams run on stand-in ranks: the head aborts that
    process's requests at the rank at once (they would run for 30 s more), the head's own streams go on, and new
    requests are served."""
    head = ServeProcess(tmp_path / "run", ranks=1, sets=['parallel.rank_engine="standin"', "standin.steps_per_s=10"])
    prompt = [300, 301, 302]
    body = {"model": head.model, "prompt": prompt, "max_tokens": 300, "stream": True, "ignore_eos": True}
    try:
        async def scenario():
            clients = [httpx.AsyncClient(timeout=60, headers=head.user) for _ in range(12)]
            streams = [await c.send(c.build_request("POST", f"{head.url}/v1/completions", json=body), stream=True)
                       for c in clients]
            assert [r.status_code for r in streams] == [200] * 12
            await until(lambda: head.state()["requests_in_flight"] == 12, 30, "12 requests in flight")
            on_head = connections_of(head.proc.pid, head.port)
            assert 0 < on_head < 12, "both processes should hold some of the 12 connections"
            os.kill(head.api_pid, signal.SIGKILL)
            await until(lambda: head.state()["requests_in_flight"] == on_head, 5,
                        "the lost process's requests aborted")
            async def goes_on(r) -> bool:  # 40 more events (4 s): past what arrived before the kill
                events = 0
                try:
                    async for line in r.aiter_lines():
                        events += line.startswith("data: ")
                        if events == 40:
                            return True
                except httpx.RemoteProtocolError:  # the killed process's connection, once its buffer is read
                    return False
                return False

            going = sum(await asyncio.gather(*(goes_on(r) for r in streams)))  # the head's own
            for c in clients:
                await c.aclose()
            return on_head, going

        on_head, going = asyncio.run(scenario())
        assert going == on_head
        assert f"API process 1 exited with code -9: its {12 - on_head} request(s) aborted" in head.log.read_text()
        wait_until(lambda: head.state()["requests_in_flight"] == 0, 30, "the closed streams to be aborted")
        with httpx.Client(timeout=60, headers=head.user) as c:
            r = c.post(f"{head.url}/v1/completions", json={**body, "stream": False, "max_tokens": 5})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    finally:
        head.stop()
    assert head.proc.returncode == 0


def test_the_second_api_process_goes_with_the_head(tmp_path):
    """It ignores SIGTERM and SIGINT (the head's to handle: it drains first) and stops when its stdin closes, which
    also happens when the head is killed -9."""
    head = ServeProcess(tmp_path / "run", ranks=1)
    try:
        os.kill(head.api_pid, signal.SIGTERM)
        os.kill(head.api_pid, signal.SIGINT)
        time.sleep(1.0)
        assert alive(head.api_pid)
        with httpx.Client(timeout=30, headers=head.user) as c:  # and the port is still served by both
            assert all(c.get(f"{head.url}/v1/models").status_code == 200 for _ in range(4))
        head.proc.kill()
        head.proc.wait()
        wait_until(lambda: not alive(head.api_pid), 10, "the second API process to stop after the head's kill -9")
    finally:
        head.stop()


def test_sigterm_drains_the_streams_of_both_processes(tmp_path):
    """SIGTERM to the head: every long stream, on either process, ends after serve.shutdown_grace_s with the
    server's 503 error event and [DONE]; the head exits 0 and the second process with it."""
    head = ServeProcess(tmp_path / "run", ranks=1, sets=['parallel.rank_engine="standin"', "standin.steps_per_s=10",
                                                         "serve.shutdown_grace_s=1"])
    body = {"model": head.model, "prompt": [300, 301], "max_tokens": 300, "stream": True, "ignore_eos": True}

    async def scenario():
        clients, streams = [], []
        # the kernel spreads connections over the two processes at random: at least 8 streams, until both hold some
        while len(streams) < 8 or (min(connections_of(head.api_pid, head.port),
                                       connections_of(head.proc.pid, head.port)) == 0 and len(streams) < 40):
            clients.append(httpx.AsyncClient(timeout=60, headers=head.user))
            c = clients[-1]
            streams.append(await c.send(c.build_request("POST", f"{head.url}/v1/completions", json=body),
                                        stream=True))
        await until(lambda: head.state()["requests_in_flight"] == len(streams), 30, "the requests in flight")
        both = connections_of(head.api_pid, head.port), connections_of(head.proc.pid, head.port)
        head.proc.send_signal(signal.SIGTERM)
        ends = []
        for r in streams:
            lines = [line async for line in r.aiter_lines() if line]
            ends.append(lines[-2:])
        for c in clients:
            await c.aclose()
        return both, ends

    try:
        (on_api, on_head), ends = asyncio.run(scenario())
        assert on_api > 0 and on_head > 0, "both processes should hold some of the streams"
        error = {"error": {"message": "The server is shutting down.", "type": "ServiceUnavailableError",
                           "param": None, "code": 503}}
        assert all(json.loads(e[0][6:]) == error and e[1] == "data: [DONE]" for e in ends), ends
        head.proc.wait(60)
        assert head.proc.returncode == 0
        wait_until(lambda: not alive(head.api_pid), 10, "the second API process to stop with the head")
    finally:
        head.stop()


def test_auth_holds_on_every_api_process(tmp_path):
    """12 connections, spread by the kernel over both processes: the API key and the admin token are checked on
    each, /admin/* reaches the coordinator from either."""
    head = ServeProcess(tmp_path / "run", ranks=1)
    clients = [httpx.Client(timeout=30) for _ in range(12)]
    try:
        for c in clients:
            no_key = c.post(f"{head.url}/v1/completions", json={"model": head.model, "prompt": "Hi"})
            assert no_key.status_code == 401
            assert no_key.json()["error"]["message"].startswith("Missing API key")
            assert c.get(f"{head.url}/admin/state", headers=head.user).status_code == 401  # the key is no token
            state = c.get(f"{head.url}/admin/state", headers=head.admin)
            assert state.status_code == 200 and state.json()["members"] == [0]
            ok = c.post(f"{head.url}/v1/completions", headers=head.user,
                        json={"model": head.model, "prompt": "Hi", "max_tokens": 3})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert connections_of(head.api_pid, head.port) > 0, "no connection reached the second API process"
        assert connections_of(head.proc.pid, head.port) > 0, "no connection reached the head's own"
        # SO_REUSEPORT does not let a second head of the same user share the port
        second = subprocess.run([sys.executable, "-m", "eep_hpc.cli", "serve", "--port", str(head.port), "--run-dir",
                                 str(tmp_path / "second"), "--set", "serve.api_servers=2"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"cannot listen on 127.0.0.1:{head.port}" in second.stderr and "Address already in use" in second.stderr
    finally:
        for c in clients:
            c.close()
        head.stop()
    assert head.proc.returncode == 0
