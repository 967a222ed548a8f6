"""Network failures between real nodes: the Slurm test cluster of .ci/slurm-up with each node in its own network
namespace, the real head on this host (at the bridge address), ranks in node jobs on n1..n4.

- A node job that comes back: preempted in the requeue partition (PreemptMode=REQUEUE, GraceTime=0), its rank is
  drained; Slurm starts the job again and its agent starts the rank again under its old id; the head refuses it and
  tells it to leave, so the job ends COMPLETED at once instead of holding the node as a rank never admitted; while
  the autoscaler wants more ranks than serve (its minimum), the rank joins again through a normal grow instead.
- A node cut off (the host end of its veth pair down) while its rank serves streams: the head notices within
  control.rank_timeout_s (its default) plus a heartbeat, the survivors re-form, every request finishes with the
  reference text; when the link comes back the cut-off rank is fenced, told it was removed, exits 0, and its node
  job ends COMPLETED while the head serves on.
- A node cut off during a scaling event: a member's or the joiner's during a grow, the departing rank's during a
  shrink. The event
  rolls back (or completes), the survivors re-form without the cut rank, nothing is left scaling or recovering,
  and no request fails.
- The head's host unreachable from a node for a moment (a blackhole route to the head's address in the node's
  namespace, 2 s, well under control.rank_timeout_s): no request lost, no recovery started.
- A slow, lossy link to one node (tc's token bucket on both ends: this kernel has no netem): every request completes
  with the reference text, no recovery; throughput and the longest stream gap against the clean link are printed
  (and written to $EEP_SLOW_LINK_JSON when set).

Skipped without the test cluster, or on its loopback layout (no namespaces: no link to cut).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgspec
import pytest

from support import (TEST_CONFIG, cluster_network, reference_texts, run_load, sacct, until, wait_sacct, wait_until,
                     why_no_slurm)

NO_SLURM = why_no_slurm()
NO_NETNS = "" if NO_SLURM or cluster_network().nodes else "the test cluster runs the loopback layout (no namespaces)"
NOT_ROOT = "" if os.geteuid() == 0 else "cutting and shaping the nodes' links (ip, tc) needs root"
WHY_SKIP = NO_SLURM or NO_NETNS or NOT_ROOT
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(WHY_SKIP), reason=WHY_SKIP)]
MAX_TOKENS = 24


@dataclass
class SlurmHead:
    head: object
    launcher: object
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def coordinator(self):
        return self.head.coordinator

    def call(self, coro, timeout_s: float = 300):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def events(self, kind: str) -> list:
        return [e for e in self.coordinator.history if e.kind == kind]


@pytest.fixture
def slurm_head(tmp_path, request):
    """The real head in a thread, its ranks (2, pool small: n3 and n4) in a Slurm node job; config sections to
    change come as the test's parameter (indirect)."""
    from eep_hpc.cluster.pools import Pool, parse_pools
    from eep_hpc.cluster.slurm import SlurmLauncher
    from eep_hpc.config import Config
    from eep_hpc.head.main import Head

    raw = tomllib.loads(TEST_CONFIG.read_text())
    pools = parse_pools(raw.pop("pools"))
    raw["serve"] = {"port": 0}
    raw["control"]["run_dir"] = str(tmp_path / "run")
    raw["control"]["host"] = cluster_network().host_address
    for section, values in getattr(request, "param", {}).items():
        raw.setdefault(section, {}).update(values)
    cfg = msgspec.convert(raw, Config)
    # a pool on n1 alone in the requeue partition, holding all its CPUs: any job of a higher tier preempts it
    pools["requeue"] = Pool(name="requeue", partition="requeue", cpus_per_node=8, mem_gb=1, time_limit_min=10,
                            warning_s=30, sbatch={"nodelist": "n1"})
    launcher = SlurmLauncher(cfg.control.run_dir, pools, default_pool="small", device="cpu")
    ready, box = threading.Event(), {}

    def main():
        loop = asyncio.new_event_loop()
        box["loop"] = loop
        try:
            box["head"] = Head(cfg, launcher=launcher)
            loop.run_until_complete(box["head"].run(on_ready=lambda h: ready.set()))
        except BaseException as e:
            box["error"] = e
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    try:
        assert ready.wait(300) and "error" not in box, box.get("error")
        yield SlurmHead(box["head"], launcher, box["loop"], thread)
    finally:
        for node in cluster_network().nodes.values():
            node.link(True)
        if "loop" in box and "head" in box:
            box["loop"].call_soon_threadsafe(box["head"].request_stop)
        thread.join(120)
        for job in launcher.jobs:  # nothing outlives the test
            if job.alive():
                subprocess.run(["scancel", "--signal=KILL", "--full", job.job_id])
                subprocess.run(["scancel", job.job_id])
    assert not thread.is_alive()


def test_node_cut_off_while_serving_is_replaced_then_fenced_and_its_job_completes(slurm_head):
    sh = slurm_head
    c = sh.coordinator
    ctl = c.cfg.control
    url, model = sh.head.url, c.model_name
    reference = asyncio.run(reference_texts(url, model, MAX_TOKENS))
    sh.call(c.grow(1, "big"))  # a third rank in a node job of its own, on n1 or n2
    victim = c.members[-1]
    victim_job = sh.launcher.jobs[-1]
    node = cluster_network().node(c.ranks[victim].host)
    survivors = [r for r in c.members if r != victim]
    assert {c.ranks[r].host for r in survivors} <= {"n3", "n4"} and node.name in {"n1", "n2"}

    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(url, model, MAX_TOKENS, stop, streams=8))
        await until(lambda: c.ranks[victim].in_flight, 60, f"rank {victim} serving")
        cut_at = time.monotonic()
        node.link(False)
        try:
            await until(lambda: any(e.phase.name == "DONE" for e in sh.events("recover")), 60,
                        lambda: f"a recovery in {[e.summary() for e in c.history]}", interval_s=0.1)
            recovered_after = time.monotonic() - cut_at
            await asyncio.sleep(1.0)  # serving goes on on the survivors while the node is still cut off
        finally:
            node.link(True)
        await asyncio.sleep(2.0)
        stop.set()
        return await load, recovered_after

    result, recovered_after = asyncio.run(scenario())
    assert result.failures == [], result.failures[:5]
    assert result.completed > 0
    for k, texts in result.texts.items():
        assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
    event = sh.events("recover")[-1]
    assert event.lost == [victim] and sorted(c.members) == sorted(survivors), event.summary()
    # noticed within the bound: its last message came at most a heartbeat before the cut, and the check runs every
    # heartbeat
    assert event.detect_s <= ctl.rank_timeout_s + 2 * ctl.heartbeat_s, event.summary()
    print(f"cut -> recovered in {recovered_after:.2f} s; detect {event.detect_s:.2f} s, summary {event.summary()}")
    # the link is back: the rank is fenced, learns it was removed, exits 0, and its node job ends on its own
    info = wait_sacct(victim_job.job_id, victim_job.job_id, {"COMPLETED", "CANCELLED", "FAILED"}, timeout_s=90)
    assert info[victim_job.job_id] == ("COMPLETED", "0:0"), info
    assert victim_job.job.results()[0].exit_codes == [0]
    assert c.health.fenced >= 1
    assert asyncio.run(reference_texts(url, model, MAX_TOKENS)) == reference


def preempt_requeue_job(sh, url: str, model: str, rank: int):
    """Under 8 streams, a job of a higher tier takes n1: the requeue job is preempted (SIGTERM: the agent's notice,
    the drain of `rank`) -> the load's result."""
    c = sh.coordinator

    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(url, model, MAX_TOKENS, stop, streams=8))
        await until(lambda: c.ranks[rank].in_flight, 60, f"rank {rank} serving")
        subprocess.run(["sbatch", "--parsable", "-p", "big", "-w", "n1", "-c", "8", "-o", "/dev/null",
                        "--wrap", "sleep 1"], capture_output=True, text=True, check=True)
        await until(lambda: any(e.phase.name == "DONE" and rank in e.summary()["left"] for e in sh.events("shrink")),
                    60, lambda: f"rank {rank} drained: {[e.summary() for e in c.history]}", interval_s=0.1)
        await asyncio.sleep(1.0)
        stop.set()
        return await load

    return asyncio.run(scenario())


def start_requeued(job_id: str) -> None:
    """Slurm requeues the job and would start it again after its requeue delay (about 2 minutes): start it now."""
    wait_sacct(job_id, job_id, {"PENDING", "REQUEUED"}, timeout_s=60)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def test_requeued_node_job_is_told_to_leave_and_releases_its_node(slurm_head):
    sh = slurm_head
    c = sh.coordinator
    url, model = sh.head.url, c.model_name
    reference = asyncio.run(reference_texts(url, model, MAX_TOKENS))
    sh.call(c.grow(1, "requeue"))
    rank = c.members[-1]
    job = sh.launcher.jobs[-1]
    first_pid = c.ranks[rank].pid
    result = preempt_requeue_job(sh, url, model, rank)
    assert result.failures == [], result.failures[:5]
    for k, texts in result.texts.items():
        assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
    start_requeued(job.job_id)
    fenced = c.health.fenced
    info = wait_sacct(job.job_id, job.job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout_s=120)
    assert info[job.job_id] == ("COMPLETED", "0:0"), info
    assert c.health.fenced > fenced  # its rank said hello again, was refused and told to leave
    assert c.ranks[rank].pid == first_pid and c.ranks[rank].state.name == "EXITED"
    assert rank not in c.members and rank not in [r["rank_id"] for r in sh.head.coordinator.cluster_state()["ranks"]]
    assert asyncio.run(reference_texts(url, model, MAX_TOKENS)) == reference


def test_head_unreachable_from_a_node_for_a_moment_loses_nothing_and_recovers_nothing(slurm_head):
    sh = slurm_head
    c = sh.coordinator
    url, model = sh.head.url, c.model_name
    reference = asyncio.run(reference_texts(url, model, MAX_TOKENS))
    rank = c.members[0]
    node = cluster_network().node(c.ranks[rank].host)
    head_address = cluster_network().host_address
    route = ["ip", "-n", node.netns, "route"]

    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(url, model, MAX_TOKENS, stop, streams=8))
        await until(lambda: c.ranks[rank].in_flight, 60, f"rank {rank} serving")
        subprocess.run([*route, "add", "blackhole", f"{head_address}/32"], check=True)
        try:
            await asyncio.sleep(2.0)
        finally:
            subprocess.run([*route, "del", "blackhole", f"{head_address}/32"], check=True)
        await asyncio.sleep(2 * c.cfg.control.rank_timeout_s)  # long enough for a needless recovery to show
        stop.set()
        return await load

    try:
        result = asyncio.run(scenario())
    finally:
        subprocess.run([*route, "del", "blackhole", f"{head_address}/32"], capture_output=True)
    assert result.failures == [], result.failures[:5]
    assert result.completed > 0
    for k, texts in result.texts.items():
        assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
    assert sh.events("recover") == [] and len(c.members) == 2 and rank in c.members, [e.summary() for e in c.history]
    assert c.health.fenced == 0


# the autoscaler wants 3 ranks, but decides only every 10 minutes: the returning rank is what brings the third back
@pytest.mark.parametrize("slurm_head", [{"adapt": {"enabled": True, "min_ranks": 3, "max_ranks": 3,
                                                   "interval_s": 600.0}}], indirect=True)
def test_requeued_node_job_joins_again_through_a_grow_while_the_autoscaler_wants_it(slurm_head):
    sh = slurm_head
    c = sh.coordinator
    url, model = sh.head.url, c.model_name
    reference = asyncio.run(reference_texts(url, model, MAX_TOKENS))
    sh.call(c.grow(1, "requeue"))
    rank = c.members[-1]
    job = sh.launcher.jobs[-1]
    first_pid = c.ranks[rank].pid
    result = preempt_requeue_job(sh, url, model, rank)
    assert result.failures == [], result.failures[:5]
    assert len(c.members) == 2
    start_requeued(job.job_id)
    wait_until(lambda: rank in c.members and c.ranks[rank].state.name == "READY", 120,
               lambda: f"rank {rank} back: {[e.summary() for e in c.history]}")
    assert c.ranks[rank].pid != first_pid and c.ranks[rank].host == "n1"
    grows = sh.events("grow")
    assert grows[-1].phase.name == "DONE" and grows[-1].summary()["joined"] == [rank], grows[-1].summary()
    assert sacct(job.job_id)[job.job_id][0] == "RUNNING"  # it holds n1 because it serves again
    assert asyncio.run(reference_texts(url, model, MAX_TOKENS)) == reference


def cut_during_event(sh, start, pick) -> tuple:
    """Under 8 streams: start a scaling event (`start()` -> its coroutine, run on the head's loop), cut the link of
    the node of rank `pick(event)` as soon as the event is open, keep it down until the event ended and the group
    serves without that rank, then bring it back -> (load result, the event's phase when the cut came, the scaling
    call's outcome, the event)."""
    c = sh.coordinator
    url, model = sh.head.url, c.model_name

    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(url, model, MAX_TOKENS, stop, streams=8))
        await until(lambda: sum(len(r.in_flight) for r in c.ranks.values()) >= 4, 60, "streams in flight")
        call = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(start(), sh.loop))
        event = await until(lambda: c.event, 120, "the scaling event to open", interval_s=0.005)
        rank = pick(event)
        await until(lambda: c.ranks[rank].host, 30, f"rank {rank} said hello")
        node = cluster_network().node(c.ranks[rank].host)
        node.link(False)
        phase = event.phase.name
        try:
            outcome = await asyncio.gather(call, return_exceptions=True)
            await until(lambda: rank not in c.members and c.event is None and not c.membership.recovering, 120,
                        lambda: f"serving without rank {rank} after the {event.kind}: "
                                f"{[e.summary() for e in c.history]}", interval_s=0.1)
            await asyncio.sleep(1.0)
        finally:
            node.link(True)
        await asyncio.sleep(2.0)
        stop.set()
        return await load, phase, outcome[0], event

    return asyncio.run(scenario())


def check_served_through(sh, result, reference) -> None:
    c = sh.coordinator
    assert result.failures == [], result.failures[:5]
    assert result.completed > 0
    for k, texts in result.texts.items():
        assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
    state = c.cluster_state()
    assert c.event is None and not c.membership.recovering and c.ready(), state
    assert asyncio.run(reference_texts(sh.head.url, c.model_name, MAX_TOKENS)) == reference


@pytest.mark.parametrize("who", ["member", "joiner"])
def test_node_cut_off_during_a_grow_rolls_back_or_completes_without_a_failed_request(slurm_head, who):
    sh = slurm_head
    c = sh.coordinator
    reference = asyncio.run(reference_texts(sh.head.url, c.model_name, MAX_TOKENS))
    members = list(c.members)
    pick = (lambda event: members[0]) if who == "member" else (lambda event: event.joining[0])
    result, phase, outcome, event = cut_during_event(sh, lambda: c.grow(1, "big"), pick)
    victim = pick(event)
    print(f"grow, {who} cut at {phase}: grow -> {event.phase.name} ({outcome!r:.200}); history "
          f"{[(e.kind, e.phase.name, e.lost) for e in c.history]}")
    assert event.kind == "grow" and event.phase.name in ("DONE", "ROLLED_BACK")
    assert victim not in c.members
    if who == "member":
        assert sh.events("recover")[-1].lost == [victim]
    else:  # the grow gave up on it; the serving members were never in doubt
        assert event.phase.name == "ROLLED_BACK" and c.members == members and sh.events("recover") == []
    check_served_through(sh, result, reference)


def test_departing_rank_cut_off_during_a_shrink_without_a_failed_request(slurm_head):
    sh = slurm_head
    c = sh.coordinator
    reference = asyncio.run(reference_texts(sh.head.url, c.model_name, MAX_TOKENS))
    sh.call(c.grow(1, "big"))
    leaving = c.members[-1]
    result, phase, outcome, event = cut_during_event(sh, lambda: c.shrink([leaving]), lambda event: leaving)
    print(f"shrink: cut at {phase}, shrink -> {event.phase.name} ({outcome!r:.200}); history "
          f"{[(e.kind, e.phase.name, e.lost) for e in c.history]}")
    assert event.kind == "shrink" and event.phase.name in ("DONE", "ROLLED_BACK")
    assert leaving not in c.members and len(c.members) == 2
    check_served_through(sh, result, reference)


# ---- slow and lossy links: tc's token bucket (this kernel has no netem; docs/multi-host.md) ----------------------


async def timed_requests(url: str, model: str, n: int, streams: int) -> dict:
    """n streamed requests (PROMPTS in turn), `streams` at a time -> texts by prompt, failures, output tokens per
    second over the whole run, and the longest gap between two chunks of one stream."""
    from support import PROMPTS

    texts: dict[int, list[str]] = {}
    failures, gaps, tokens = [], [], 0
    queue = list(range(n))

    async def one(client, i):
        nonlocal tokens
        body = {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS, "temperature": 0,
                "stream": True, "ignore_eos": True}
        chunks, last, gap = [], time.monotonic(), 0.0
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            assert r.status_code == 200, await r.aread()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                now = time.monotonic()
                if chunks:
                    gap = max(gap, now - last)
                last = now
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                chunks.append(chunk["choices"][0]["text"])
        tokens += len(chunks)
        gaps.append(gap)
        texts.setdefault(i % len(PROMPTS), []).append("".join(chunks))

    async def worker():
        async with httpx.AsyncClient(timeout=300) as client:
            while queue:
                i = queue.pop(0)
                try:
                    await one(client, i)
                except Exception as e:
                    failures.append(f"request {i}: {type(e).__name__}: {e}")

    t0 = time.monotonic()
    await asyncio.gather(*[worker() for _ in range(streams)])
    elapsed = time.monotonic() - t0
    return {"texts": texts, "failures": failures, "output_tok_s": round(tokens / elapsed, 1),
            "max_stream_gap_s": round(max(gaps), 3), "elapsed_s": round(elapsed, 2)}


def shape_link(node, spec: list[str], on: bool) -> None:
    """tc's token bucket on both ends of the node's link (the host's veth end: traffic to the node; the node's
    eth0: traffic from it)."""
    for cmd in (["tc"], ["ip", "netns", "exec", node.netns, "tc"]):
        dev = node.veth if len(cmd) == 1 else "eth0"
        if on:
            subprocess.run([*cmd, "qdisc", "add", "dev", dev, "root", *spec], check=True)
        else:
            subprocess.run([*cmd, "qdisc", "del", "dev", dev, "root"], capture_output=True)


def link_stats(node) -> dict:
    """Packets sent and dropped by the token buckets on both ends of the node's link."""
    out = {"sent": 0, "dropped": 0}
    for cmd, dev in ((["tc"], node.veth), (["ip", "netns", "exec", node.netns, "tc"], "eth0")):
        text = subprocess.run([*cmd, "-s", "qdisc", "show", "dev", dev], capture_output=True, text=True).stdout
        m = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", text)
        if m:
            out["sent"] += int(m.group(1))
            out["dropped"] += int(m.group(2))
    return out


SLOW_LINK = ["tbf", "rate", "1mbit", "burst", "8kb", "latency", "20ms"]  # 125 kB/s; a packet that would queue over
# 20 ms is dropped: slow, and lossy under bursts


def test_slow_lossy_link_to_one_node_serves_every_request_exactly(slurm_head, tmp_path):
    sh = slurm_head
    c = sh.coordinator
    url, model = sh.head.url, c.model_name
    reference = asyncio.run(reference_texts(url, model, MAX_TOKENS))
    sh.call(c.grow(1, "big"))
    node = cluster_network().node(c.ranks[c.members[-1]].host)
    clean = asyncio.run(timed_requests(url, model, 32, 8))
    shape_link(node, SLOW_LINK, True)
    try:
        slow = asyncio.run(timed_requests(url, model, 32, 8))
        slow["packets"] = link_stats(node)
    finally:
        shape_link(node, SLOW_LINK, False)
    for run in (clean, slow):
        assert run["failures"] == [], run["failures"][:5]
        for k, texts in run["texts"].items():
            assert all(t == reference[k] for t in texts), f"prompt {k}: text differs from the reference"
    assert sh.events("recover") == [] and len(c.members) == 3
    figures = {"link": " ".join(SLOW_LINK), "node": node.name, "requests": 32, "streams": 8, "max_tokens": MAX_TOKENS,
               "clean": {k: v for k, v in clean.items() if k not in ("texts", "failures")},
               "slow": {k: v for k, v in slow.items() if k not in ("texts", "failures")}}
    print(json.dumps(figures))
    if os.environ.get("EEP_SLOW_LINK_JSON"):
        Path(os.environ["EEP_SLOW_LINK_JSON"]).write_text(json.dumps(figures, indent=1) + "\n")
