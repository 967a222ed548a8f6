"""What the tests share (conftest.py holds only fixtures; no test module imports from another):

- a real head (coordinator + HTTP API) in a background thread, with real rank processes: `start_head`
- waiting for a server-side fact with a deadline, never for a guessed time: `wait_until`, `until`
- rank processes as /proc sees them: `alive`, `rss_kib`, `wait_gone`
- placement and scale-event helpers: `only_held_by`, `pid_of`, `rank_pids`, `wait_for_event`, `metric`
- in-process engines on small checkpoints: `single_rank_engine`, `greedy`, `TOKEN_PROMPTS`, `NEW_TOKENS`
- the fake model's sampling rule of the scheduler tests: `model_token`
- the Slurm test cluster (.ci/slurm-up): `why_no_slurm`, `sacct`, `wait_sacct`, `ROOT`, `TEST_CONFIG`,
  `settle_test_cluster` (what every Slurm test starts from), `cluster_report`, and its node network (one namespace
  per node, links a test can cut): `cluster_network`, `TestNode`

- streaming load over HTTP with reference texts: `run_load`, `reference_texts`, `stream_completion`, `PROMPTS`
- random Hugging Face checkpoints and their transformers models: `save_random_hf_model`, `hf_model`
- token-id prompts read back through the API (a tokenizer whose token i is "<ti>"): `PROMPT_IDS`, `id_token_model`,
  `complete`, `greedy_ids`, `scale`, `engine_for`; bf16 against transformers' own error: `assert_within_bf16_error`
- vLLM's sampling penalties on one row of logits, in plain Python: `reference_penalties`
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import torch

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


def open_fds_besides_clients_of(port: int) -> int:
    """This process's open files, less both ends of the TCP connections to `port` (a load running in the same
    process as the head opens and closes those as it likes; the listening socket and all else stay counted)."""
    connection_inodes = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()  # sl, local_address, rem_address, st, ..., inode (index 9)
            ports = {int(fields[i].rsplit(":", 1)[1], 16) for i in (1, 2)}
            if port in ports and fields[3] != "0A":  # 0A: LISTEN
                connection_inodes.add(fields[9])
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:  # closed meanwhile
            continue
    return sum(1 for link in links if not (link.startswith("socket:[") and link[8:-1] in connection_inodes))


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


def admin_steps_under_load(head, steps: list[tuple[str, dict]], max_tokens: int, streams: int,
                           pause_s: float) -> tuple:
    """POST each (admin path, body) of `steps` in turn, e.g. ("scale/grow", {"n": 1}), while `streams` clients
    stream, pausing pause_s before each and after the last; each must answer 200 -> (the load's result, the
    answers' JSON)."""
    async def scenario():
        stop = asyncio.Event()
        load = asyncio.create_task(run_load(head.url, head.model, max_tokens, stop, streams=streams))
        answers = []
        async with httpx.AsyncClient(timeout=300) as client:
            for path, body in steps:
                await asyncio.sleep(pause_s)
                r = await client.post(f"{head.url}/admin/{path}", json=body)
                assert r.status_code == 200, r.text
                answers.append(r.json())
        await asyncio.sleep(pause_s)
        stop.set()
        return await load, answers

    return asyncio.run(scenario())


def spawn_workers(target, n: int, *args, timeout_s: float = 300) -> dict:
    """Run target(i, store_port, results, *args) in n spawned processes around one TCPStore; -> results (a shared
    dict the workers fill) once every process exited 0."""
    import multiprocessing as mp

    import torch.distributed as dist

    master = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=120))
    ctx = mp.get_context("spawn")
    results = ctx.Manager().dict()
    procs = [ctx.Process(target=target, args=(i, master.port, results, *args)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    assert [p.exitcode for p in procs] == [0] * n
    return dict(results)


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


@dataclass
class TestNode:
    name: str  # the Slurm node name, also its hostname
    netns: str  # its network namespace
    veth: str  # the host end of its link: `ip link set VETH down` cuts the node off
    address: str

    def link(self, up: bool) -> None:
        subprocess.run(["ip", "link", "set", self.veth, "up" if up else "down"], check=True)


@dataclass
class ClusterNetwork:
    host_address: str  # where processes on this host (a test's stand-in head, an in-process head) are reached
    nodes: dict[str, TestNode]  # empty on the loopback layout

    def node(self, name: str) -> TestNode:
        return self.nodes[name]


@functools.cache
def cluster_network() -> ClusterNetwork:
    """The node network of the test cluster: .ci/slurm-up writes the namespace layout next to slurm.conf
    ($DIR/network); without it every node shares this host's loopback."""
    path = Path(os.environ.get("SLURM_CONF", "/nonexistent")).parent / "network"
    if not path.is_file():
        return ClusterNetwork("127.0.0.1", {})
    host, nodes = "127.0.0.1", {}
    for line in path.read_text().splitlines():
        kind, *rest = line.split()
        if kind == "bridge":
            host = rest[1]
        elif kind == "node":
            nodes[rest[0]] = TestNode(*rest)
    return ClusterNetwork(host, nodes)


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


def cluster_report() -> str:
    """squeue and the nodes' states with Slurm's reasons: what a Slurm test's failure message should carry."""
    out = []
    for cmd in (["squeue", "-h", "-o", "%i %P %j %T %R"], ["sinfo", "-h", "-N", "-o", "%N %T %E"]):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        out.append(f"$ {' '.join(cmd)}\n{r.stdout}{r.stderr}")
    return "\n".join(out)


def settle_test_cluster(timeout_s: float = 90.0) -> None:
    """Wait until no job of an earlier test is left and every node is idle, so each Slurm test starts from an empty
    cluster. A node that Slurm set DOWN while an earlier test cut or throttled its link (its pings were lost) is
    resumed: once DOWN, slurmctld takes minutes to try it again. Jobs still there after a grace period are
    cancelled (the test cluster is the tests' own)."""
    deadline = time.monotonic() + timeout_s
    cancel_at = time.monotonic() + timeout_s / 3
    while True:
        jobs_out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=20)
        nodes_out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
        jobs = sorted({j.split("+")[0] for j in jobs_out.stdout.split()})  # a het job's components: its id
        nodes = [line.split() for line in nodes_out.stdout.splitlines()]
        down = sorted({name for name, state in nodes if state.rstrip("*~#!%$@^-") in RESUMABLE_STATES})
        if down:
            subprocess.run(["scontrol", "update", f"NodeName={','.join(down)}", "State=RESUME"],
                           capture_output=True, timeout=20)
        answered = jobs_out.returncode == 0 and nodes_out.returncode == 0 and nodes
        if answered and not jobs and all(state == "idle" for _, state in nodes):
            return
        if jobs and time.monotonic() > cancel_at:
            subprocess.run(["scancel", "--full", "--signal=KILL", *jobs], capture_output=True, timeout=20)
            subprocess.run(["scancel", *jobs], capture_output=True, timeout=20)
        if time.monotonic() > deadline:
            raise AssertionError(f"the Slurm test cluster did not settle in {timeout_s:.0f} s:\n{cluster_report()}")
        time.sleep(0.5)


RESUMABLE_STATES = {"down", "drain", "drng", "fail", "failg"}  # what `scontrol update State=RESUME` brings back


# ---- streaming load over HTTP ------------------------------------------------------------------------------------


PROMPTS = [f"Request {i}: the {w} of the story is" for i, w in enumerate(
    ["start", "middle", "end", "hero", "place", "time", "cause", "moral",
     "voice", "twist", "theme", "setting", "plot", "villain", "ending", "title"])]


@dataclass
class LoadResult:
    texts: dict[int, list[str]] = field(default_factory=dict)  # prompt index -> texts of completed requests
    failures: list[str] = field(default_factory=list)
    completed: int = 0


async def stream_completion(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    text, done, finish = [], False, None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"stream error: {chunk['error']}")
            text.append(chunk["choices"][0]["text"])
            finish = chunk["choices"][0]["finish_reason"] or finish
    if not done or finish != "length":
        raise RuntimeError(f"stream ended without [DONE] or with finish_reason={finish!r}")
    return "".join(text)


async def reference_texts(url: str, model: str, max_tokens: int, headers: dict | None = None) -> list[str]:
    async with httpx.AsyncClient(timeout=120, headers=headers) as client:
        return list(await asyncio.gather(*[stream_completion(client, url, model, p, max_tokens) for p in PROMPTS]))


async def run_load(url: str, model: str, max_tokens: int, stop: asyncio.Event, streams: int = 16,
                   headers: dict | None = None) -> LoadResult:
    """`streams` clients, each issuing requests back to back (prompt i, i + streams, ...) until `stop` is set."""
    result = LoadResult()

    async def client_loop(worker: int):
        async with httpx.AsyncClient(timeout=300, headers=headers) as client:
            i = worker
            while not stop.is_set():
                k = i % len(PROMPTS)
                try:
                    text = await stream_completion(client, url, model, PROMPTS[k], max_tokens)
                    result.texts.setdefault(k, []).append(text)
                    result.completed += 1
                except Exception as e:  # every failure is a test failure; keep going to count them all
                    result.failures.append(f"prompt {k}: {type(e).__name__}: {e}")
                i += streams

    await asyncio.gather(*[client_loop(w) for w in range(streams)])
    return result


# ---- random Hugging Face checkpoints ----------------------------------------------------------------------------


# DeepSeek-V2-Lite's shape in small: MLA with q straight from q_proj, yarn RoPE, a dense first layer, shared experts;
# and group-limited routing with a scaled top-k (V2's, not Lite's) so that every routing path is exercised.
DEEPSEEK_V2_LITE_LIKE = dict(
    num_attention_heads=4, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32,
    n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3, first_k_dense_replace=1,
    q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5, norm_topk_prob=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                     "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1},
)
# DeepSeek-V2's (full) attention shape: q through a low-rank q_a_proj / q_a_layernorm / q_b_proj; greedy routing.
DEEPSEEK_V2_LIKE = dict(
    DEEPSEEK_V2_LITE_LIKE, q_lora_rank=24, topk_method="greedy", n_group=None, topk_group=None,
    routed_scaling_factor=1.0, num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def save_random_hf_model(kind: str, path: Path, seed: int = 0, **overrides) -> Path:
    """kind: qwen3_moe | mixtral | deepseek_v2_lite | deepseek_v2; overrides replace DeepSeek config fields."""
    import transformers

    torch.manual_seed(seed)
    common = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            **common, head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], rope_theta=10000.0,
        )
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind.startswith("deepseek_v2"):
        shape = DEEPSEEK_V2_LITE_LIKE if kind == "deepseek_v2_lite" else DEEPSEEK_V2_LIKE
        cfg = transformers.DeepseekV2Config(**{**common, **shape, **overrides})
        model = transformers.DeepseekV2ForCausalLM(cfg)
    else:
        cfg = transformers.MixtralConfig(**common, intermediate_size=48, num_local_experts=8, rope_theta=1e6)
        model = transformers.MixtralForCausalLM(cfg)
    # HF initialises with std 0.02: scale up so logits are spread and greedy choices are clear-cut
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if p.dim() > 1 else 1.0)
            elif kind.startswith("deepseek_v2"):  # norm weights away from 1, so a misplaced norm shows
                p.normal_(1.0, 0.2)
    model.save_pretrained(path)
    return path


def hf_model(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device).eval()


# ---- token-id prompts through the API; bf16 against transformers -------------------------------------------------


# 16 token-id prompts of the tiny vocabulary (ids 3..511, past its special tokens): one token, short ones, and
# lengths on both sides of a 16-token KV block.
PROMPT_LENGTHS = [1, 2, 3, 5, 8, 13, 15, 16, 17, 24, 31, 32, 33, 40, 49, 64]
PROMPT_IDS = [torch.randint(3, 512, (n,), generator=torch.Generator().manual_seed(100 + n)).tolist()
              for n in PROMPT_LENGTHS]


def write_id_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """tokenizer.json and tokenizer_config.json of a word-level vocabulary whose token i is the text "<ti>"."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"<t{i}>": i for i in range(vocab_size)}, unk_token="<t0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def id_token_model(src: Path, dst: Path) -> Path:
    """A model directory with src's config and weights (linked) and the id tokenizer (`write_id_tokenizer`)."""
    dst.mkdir(parents=True)
    for f in Path(src).iterdir():
        if f.is_file() and not f.name.startswith("tokenizer"):
            (dst / f.name).symlink_to(f.resolve())
    write_id_tokenizer(dst, json.loads((dst / "config.json").read_text())["vocab_size"])
    return dst


def token_id(piece: str) -> int:
    m = re.fullmatch(r"<t(\d+)>", piece)
    assert m, f"{piece!r} is not a token of the id tokenizer"
    return int(m.group(1))


@dataclass
class Completion:
    ids: list[int]  # the generated token ids
    logprobs: list[float]  # theirs
    top: list[dict[int, float]]  # per generated token: the most likely tokens' logprobs (the chosen one included)
    prompt_top: list[dict[int, float]]  # with echo: the same for prompt tokens 1.. (token 0 has none)


async def _complete_one(client: httpx.AsyncClient, url: str, model: str, prompt: list[int], max_tokens: int,
                        top: int, echo: bool) -> Completion:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "logprobs": top, "echo": echo}
    r = await client.post(f"{url}/v1/completions", json=body)
    assert r.status_code == 200, r.text[:500]
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "length", choice
    lp = choice["logprobs"]
    ids = [token_id(t) for t in lp["tokens"]]
    tops = [None if d is None else {token_id(k): v for k, v in d.items()} for d in lp["top_logprobs"]]
    n = len(prompt) if echo else 0
    assert len(ids) == n + max_tokens and ids[:n] == prompt[:n], (prompt, ids)
    return Completion(ids[n:], lp["token_logprobs"][n:], tops[n:], tops[1:n])


def complete(url: str, model: str, prompts: list[list[int]], max_tokens: int, top: int = 0,
             echo: bool = False) -> list[Completion]:
    """Greedy completions of token-id prompts, sent at once (one request each), from a model served with the id
    tokenizer; `top` most likely tokens' logprobs per token, and the prompt's too with echo."""
    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*[_complete_one(client, url, model, p, max_tokens, top, echo)
                                          for p in prompts])

    return list(asyncio.run(main()))


def greedy_ids(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    return [c.ids for c in complete(url, model, prompts, max_tokens)]


def scale(head, action: str, body: dict) -> dict:
    """POST /admin/scale/{grow,shrink}; the event's figures."""
    r = httpx.post(f"{head.url}/admin/scale/{action}", json=body, timeout=600)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def engine_for(model_dir: Path, device: str = "cpu", **model):
    """A one-rank engine in process holding every expert (no head)."""
    from eep_hpc import protocol as P
    from eep_hpc.config import Config, EngineConfig, ModelConfig
    from eep_hpc.engine.rank_engine import build_engine
    from eep_hpc.model.arch import load_arch
    from eep_hpc.parallel.groups import EpochGroup

    arch = load_arch(model_dir)
    cfg = Config(model=ModelConfig(path=str(model_dir), **model), engine=EngineConfig(num_kv_blocks=256))
    launch = P.RankLaunch(rank_id=0, head_address="", model_dir=str(model_dir), eos_token_ids=[], device=device,
                          config=cfg)
    epoch = P.Epoch(epoch=0, rank_ids=[0], store_host="", store_port=0,
                    physical_to_logical=[list(range(arch.num_experts))] * len(arch.moe_layers),
                    slot_offsets=[0, arch.num_experts])
    return build_engine(launch, epoch, EpochGroup(None, 0, 0, 1, torch.device(device)))


# ---- fixtures ------------------------------------------------------------------------------------------------------


def rms(xs: list[float]) -> float:
    return (sum(x * x for x in xs) / len(xs)) ** 0.5


def assert_within_bf16_error(ours: list[list[float]], theirs: list[list[float]], floor: float = 0.01) -> None:
    """Typical (the median position) and worst (the prompt of largest RMS) error of ours within twice transformers'
    bf16 error (+ floor, in nats). bf16 rounding and the routing choices it flips (the tiny model's router logits
    are spread, some tokens sit near a tie between experts) make the worst positions far worse than the median."""
    med_ours, med_theirs = (statistics.median(x for e in es for x in e) for es in (ours, theirs))
    worst_ours, worst_theirs = max(map(rms, ours)), max(map(rms, theirs))
    print(f"logprob error, nats: median {med_ours:.4f} (transformers bf16 {med_theirs:.4f}), worst prompt's RMS "
          f"{worst_ours:.4f} (transformers bf16 {worst_theirs:.4f})")
    assert med_ours <= 2 * med_theirs + floor, (med_ours, med_theirs)
    assert worst_ours <= 2 * worst_theirs + floor, (worst_ours, worst_theirs)


# ---- sampling penalties --------------------------------------------------------------------------------------------


def reference_penalties(row: list[float], prompt: list[int], output: list[int], sampling) -> list[float]:
    """vLLM's presence, frequency and repetition penalties on one row of logits, element by element."""
    out = []
    for v, x in enumerate(row):
        count = output.count(v)
        if v in prompt or count:
            x = x / sampling.repetition_penalty if x > 0 else x * sampling.repetition_penalty
        x -= sampling.frequency_penalty * count + sampling.presence_penalty * (count > 0)
        out.append(x)
    return out
