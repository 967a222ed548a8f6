"""What the tests share (conftest.py holds only fixtures; no test module imports from another):

- a real head (coordinator + HTTP API) in a background thread, with real rank processes: `start_head`
- waiting for a server-side fact with a deadline, never for a guessed time: `wait_until`, `until`
- rank processes as /proc sees them: `alive`, `rss_kib`, `wait_gone`
- placement and scale-event helpers: `only_held_by`, `pid_of`, `rank_pids`, `wait_for_event`, `metric`
- in-process engines on small checkpoints: `single_rank_engine`, `greedy`, `TOKEN_PROMPTS`, `NEW_TOKENS`
- the fake model's sampling rule of the scheduler tests: `model_token`
- the Slurm test cluster (.ci/slurm-up): `why_no_slurm`, `sacct`, `wait_sacct`, `ROOT`, `TEST_CONFIG`

Streaming load (streaming_load.py) and random Hugging Face checkpoints (hf_reference.py) keep their own modules.
"""

from __future__ import annotations

import asyncio
import functools
import os
import shutil
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
TEST_CONFIG = ROOT / "configs" / "slurm-test.toml"


# ---- waiting for a fact ------------------------------------------------------------------------------------------


def _describe(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


def wait_until(fact: Callable[[], T], timeout_s: float = 30.0, what: str | Callable[[], str] = "",
               interval_s: float = 0.05) -> T:
    """Poll `fact()` until it returns something truthy and return that; after `timeout_s`, fail with `what` (a
    string, or a callable for the state at that moment) and the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fact()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {_describe(what)} (last: {value!r})")
        time.sleep(interval_s)


async def until(fact: Callable[[], T], timeout_s: float = 30.0, what: str | Callable[[], str] = "",
                interval_s: float = 0.05) -> T:
    """`wait_until` for a coroutine: the event loop runs on between polls (`fact` itself is a plain call)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = fact()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s:g} s: {_describe(what)} (last: {value!r})")
        await asyncio.sleep(interval_s)


# ---- a real head ---------------------------------------------------------------------------------------------------


@dataclass
class RunningHead:
    head: object
    url: str
    model: str
    tokenizer: object
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    errors: list = field(default_factory=list)

    def state(self) -> dict:
        r = httpx.get(f"{self.url}/admin/state", timeout=10)
        r.raise_for_status()
        return r.json()

    def call(self, coro, timeout: float = 300):
        """Run a coroutine on the head's event loop (admin actions in tests)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.head.request_stop)
        self.thread.join(60)
        assert not self.thread.is_alive(), "head did not stop"


def start_head(run_dir: Path, ranks: int = 1, **overrides) -> RunningHead:
    """Start a head in a background thread (its own event loop) and wait until it serves."""
    from eep_hpc.head.main import Head
    from eep_hpc.config import load_config

    sections = {"serve": {"port": 0}, "parallel": {"ranks": ranks, "device": "cpu"}, "control": {"run_dir": str(run_dir)}}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    cfg = load_config(None, **sections)
    ready = threading.Event()
    box: dict = {}

    def main():
        loop = asyncio.new_event_loop()
        box["loop"] = loop
        head = Head(cfg)
        box["head"] = head
        try:
            loop.run_until_complete(head.run(on_ready=lambda h: ready.set()))
        except BaseException as e:  # surfaced to the test below
            box["error"] = e
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="head", daemon=True)
    thread.start()
    ready.wait(300)
    if "error" in box or not ready.is_set():
        raise RuntimeError(f"head failed to start: {box.get('error')!r}")
    head = box["head"]
    return RunningHead(head, head.url, head.coordinator.model_name, head.coordinator.tokenizer, thread, box["loop"])


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of /metrics: the sum over the series of `name` whose labels include `labels` (0 if none)."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith("#") or not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


# ---- rank processes, placement, scale events ---------------------------------------------------------------------


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])


def rank_pids(head) -> dict[int, int]:
    return {r["rank_id"]: r["pid"] for r in head.state()["ranks"] if r["pid"]}


def pid_of(state: dict, rank_id: int) -> int:
    return next(r["pid"] for r in state["ranks"] if r["rank_id"] == rank_id)


def job_pid(rank: dict) -> int | None:
    """The pid of a local rank's job process (submitit's, which runs the rank under it): job ids are local-PID."""
    job_id = str(rank.get("job_id") or "")
    return int(job_id[6:]) if job_id.startswith("local-") and job_id[6:].isdigit() else None


async def wait_gone(pids, timeout_s: float, what: str) -> None:
    """Every process of `pids` has exited (or is a zombie) within `timeout_s`, else fail naming the live ones."""
    pids = set(pids)
    await until(lambda: not any(alive(p) for p in pids), timeout_s,
                lambda: f"{what}: process(es) {sorted(p for p in pids if alive(p))} still alive")


def only_held_by(placement: dict, members: list[int], leaving: list[int]) -> set[tuple[int, int]]:
    """(layer, expert) pairs whose every replica sits on a leaving rank."""
    offs = placement["slot_offsets"]
    out = set()
    for layer, row in enumerate(placement["physical_to_logical"]):
        holders: dict[int, set[int]] = {}
        for i, rid in enumerate(members):
            for e in row[offs[i] : offs[i + 1]]:
                holders.setdefault(e, set()).add(rid)
        out |= {(layer, e) for e, h in holders.items() if h <= set(leaving)}
    return out


async def wait_for_event(head, kind: str, count: int, timeout_s: float = 120) -> dict:
    """The `count`-th scale event of `kind` that completed (phase DONE)."""
    def done():
        events = [e for e in head.state()["scale_events"] if e["kind"] == kind and e["phase"] == "DONE"]
        return events[count - 1] if len(events) >= count else None

    return await until(done, timeout_s, lambda: f"{count} {kind} event(s) DONE in {head.state()['scale_events']}",
                       interval_s=0.1)


# ---- in-process engines ------------------------------------------------------------------------------------------

# token-id prompts for in-process engines against transformers (short, long, single token, past one KV block)
TOKEN_PROMPTS = [[1, 5, 9, 200, 3], list(range(10, 47)), [7],
                 [100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110, 111, 112, 113, 114, 115, 116]]
NEW_TOKENS = 32


def single_rank_engine(model_dir, num_experts, num_moe_layers, **engine):
    """An in-process engine holding every expert of a checkpoint (one rank, no head)."""
    import torch

    from eep_hpc import protocol as P
    from eep_hpc.config import Config, ModelConfig
    from eep_hpc.engine.rank_engine import build_engine
    from eep_hpc.parallel.groups import EpochGroup

    cfg = Config(model=ModelConfig(path=str(model_dir)))
    if engine:
        cfg.engine = type(cfg.engine)(**engine)
    launch = P.RankLaunch(rank_id=0, head_address="", model_dir=str(model_dir), eos_token_ids=[], device="cpu", config=cfg)
    epoch = P.Epoch(epoch=0, rank_ids=[0], store_host="", store_port=0,
                    physical_to_logical=[list(range(num_experts))] * num_moe_layers, slot_offsets=[0, num_experts])
    return build_engine(launch, epoch, EpochGroup(None, 0, 0, 1, torch.device("cpu")))


def greedy(engine, prompts: list[list[int]], n: int = 24) -> list[list[int]]:
    """Greedy token ids of each prompt, run to n tokens on an in-process RankEngine."""
    from eep_hpc import protocol as P

    sampling = P.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(P.AddRequest(request_id=str(i), prompt_token_ids=p, sampling=sampling))
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(prompts))]


def model_token(request_id: str, index: int) -> int:
    """What the scheduler tests' fake model samples as output number `index` of a request: never EOS, the same
    after any preemption."""
    return 10 + zlib.crc32(f"{request_id}/{index}".encode()) % 1000


# ---- the Slurm test cluster --------------------------------------------------------------------------------------


@functools.cache
def why_no_slurm() -> str:
    """Why the Slurm tests cannot run here ("" when the .ci/slurm-up test cluster answers)."""
    if not os.environ.get("SLURM_CONF"):
        return 'SLURM_CONF is not set (start the test cluster: eval "$(.ci/slurm-up)")'
    if shutil.which("sinfo") is None:
        return "Slurm's commands are not installed"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%R"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 20 s"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip()}"
    if not {"big", "small", "low"} <= set(out.stdout.split()):
        return "not the .ci/slurm-up test cluster (partitions big, small, low missing)"
    return ""


def sacct(job_id: str) -> dict[str, tuple[str, str]]:
    """JobID -> (State, ExitCode) of the job, its het components and steps."""
    out = subprocess.run(["sacct", "-n", "-P", "-j", job_id, "-o", "JobID,State,ExitCode"], capture_output=True,
                         text=True, check=True).stdout
    return {jid: (state.split()[0], code) for jid, state, code in (line.split("|") for line in out.splitlines())}


def wait_sacct(job_id: str, key: str, states: set[str], timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        info = sacct(job_id)
        if info.get(key, ("",))[0] in states:
            return info
        if time.monotonic() > deadline:
            raise AssertionError(f"sacct {key}: {info.get(key)} not in {states} after {timeout_s:.0f} s: {info}")
        time.sleep(0.5)
