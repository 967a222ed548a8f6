"""`eep-hpc bench-head`: how many streamed tokens one head passes on, and what each costs it.

A head is started (`eep-hpc serve`, the real one) with N stand-in ranks (parallel.rank_engine = "standin",
engine/standin.py: the real rank process without a model, stepping at --steps-per-s with batches of up to
--max-batch). Lean HTTP clients (sse_client.py) keep --streams streamed requests open, each of --output-len
tokens, for --rounds requests per stream. The head (all its threads) runs on one CPU, the clients and the stand-in
ranks on the other (--head-cpu, --client-cpu), so the head's CPU is its own.

Measured, per point of --steps-per-s (a fresh head each):
- delivered tok/s: tokens received by the clients (an event may carry several: sse_client.py counts them by their
  text) / the time from the first request to the last [DONE]
  (and in the middle half of that time, where every stream is open);
  offered tok/s: what the ranks would emit at full batches (ranks x min(max_batch, streams / ranks) x steps/s);
- added delay: for every token, the time the client received it minus the time the stand-in emitted it (its
  step's outputs made, before the rank encodes and sends them; both clocks are this machine's time.time());
- CPU: utime + stime of the head process (every thread), of the ranks and of the client over the load; the
  head's per token = its CPU seconds / tokens delivered;
- with --profile: py-spy (if installed) samples the head during a second, identical load, and the functions with
  the most samples (own and inclusive) are listed.

With --scale-plan "grow@5,kill@12" the coordinator's own work is measured under the load: at those seconds into
the load, one stand-in rank more through POST /admin/scale/grow (as `eep-hpc bench --scale-plan` grows), or a
SIGKILL of the process of the member rank with the most requests in flight, after which the head must notice the
loss and recover (its requests started again on the survivors). Every stream keeps requesting (past --rounds) until
the last event has finished and --scale-settle-s more, every stream's text is checked, and each event records when
it started, how long it took (grow answered / the head's recover event DONE), the head's own figures, and the
longest gap between two tokens any stream saw around it. Ranks started by a grow are pinned as the others.

With --api-servers N (serve.api_servers) the head has N - 1 more API processes on its port, each pinned to a CPU
of its own (--api-cpus; the head's first); their CPU counts with the head's ("API CPU": all N processes), and each
process's share is reported too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
import numpy as np

from eep_hpc.bench.report import write_result
from eep_hpc.bench.scale_plan import ScalePlan, parse_timed_plan
from eep_hpc.bench.sse_client import Connection, StreamResult

CLK_TCK = os.sysconf("SC_CLK_TCK")


class HeadBenchError(RuntimeError):
    """The benchmark cannot run; the message says why."""


def add_head_bench_parser(subparsers) -> argparse.ArgumentParser:
    b = subparsers.add_parser(
        "bench-head", help="the head's own throughput: N stand-in ranks (no model) and lean streaming clients",
        description="Start a head with N stand-in ranks that emit tokens at a set rate, keep many streamed "
                    "requests open against it, and measure the tokens per second it passes on, the delay it adds "
                    "to each token, and its CPU per token.")
    b.add_argument("--standin-ranks", type=int, default=4, help="stand-in ranks (default %(default)s)")
    b.add_argument("--steps-per-s", default="50",
                   help="steps per second of each rank; a comma list runs one head per value (default %(default)s)")
    b.add_argument("--max-batch", type=int, default=0,
                   help="requests per step per rank (default: streams / ranks, rounded up)")
    b.add_argument("--streams", type=int, default=512, help="streamed requests kept open (default %(default)s)")
    b.add_argument("--output-len", type=int, default=128, help="tokens per request (default %(default)s)")
    b.add_argument("--input-len", type=int, default=16, help="prompt tokens (default %(default)s)")
    b.add_argument("--rounds", type=int, default=4, help="requests per stream, one after another (default %(default)s)")
    b.add_argument("--head-cpu", type=int, default=0, help="the CPU the head runs on (default %(default)s)")
    b.add_argument("--api-servers", type=int, default=1,
                   help="API processes on the head's port, the head's own included (serve.api_servers; default "
                        "%(default)s)")
    b.add_argument("--api-cpus", default="",
                   help="comma list: the CPUs of the head's other API processes, one each (default: the CPUs after "
                        "--head-cpu, in turn)")
    b.add_argument("--client-cpu", type=int, default=1,
                   help="the CPU of the clients and the stand-in ranks (default %(default)s)")
    b.add_argument("--rank-cpu", type=int, default=-1,
                   help="the stand-in ranks' CPU, when it should not be the clients' (default: --client-cpu)")
    b.add_argument("--nice", type=int, default=0,
                   help="niceness of the head, ranks and clients, e.g. -5 on a machine others use too (needs the "
                        "privilege; default %(default)s: unchanged)")
    b.add_argument("--profile", action="store_true", help="also sample the head with py-spy during a second load")
    b.add_argument("--profile-api", type=int, default=0, metavar="I",
                   help="with --profile: sample API process I instead (0: the head's own; default %(default)s)")
    b.add_argument("--scale-plan", default="", metavar="EVENTS",
                   help="scale events during the load, e.g. grow@5,kill@12: grow / shrink one rank through the admin "
                        "API, or kill -9 one member rank, at seconds into the load")
    b.add_argument("--scale-settle-s", type=float, default=3.0,
                   help="with --scale-plan: load goes on this long after the last event (default %(default)s)")
    b.add_argument("--recover-timeout-s", type=float, default=180.0,
                   help="with --scale-plan: a kill not recovered in this long counts as failed (default %(default)s)")
    b.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="passed to the head's `eep-hpc serve --set` (repeatable)")
    b.add_argument("--run-dir", default="runs/bench-head", help="the head's run dir (default %(default)s)")
    b.add_argument("--result-file", help="JSON result (default: <run dir>/bench-head-<time>.json)")
    b.set_defaults(func=run_head_bench)
    return b


def run_head_bench(args: argparse.Namespace) -> int:
    try:
        points = [float(v) for v in args.steps_per_s.split(",")]
    except ValueError:
        print(f"eep-hpc bench-head: --steps-per-s wants numbers, got {args.steps_per_s!r}", file=sys.stderr)
        return 2
    problems = [msg for bad, msg in (
        (args.standin_ranks < 1, "--standin-ranks must be at least 1"),
        (args.streams < 1, "--streams must be at least 1"),
        (args.output_len < 1, "--output-len must be at least 1"),
        (args.input_len < 1, "--input-len must be at least 1"),
        (args.rounds < 1, "--rounds must be at least 1"),
        (any(p <= 0 for p in points), "--steps-per-s must be positive"),
        (args.max_batch < 0, "--max-batch must be at least 1"),
        (args.api_servers < 1, "--api-servers must be at least 1"),
    ) if bad]
    try:
        args.timed_plan = parse_timed_plan(args.scale_plan) if args.scale_plan else []
    except ValueError as e:
        problems.append(str(e))
    cpus = os.sched_getaffinity(0)
    try:
        args.api_cpu_list = api_cpus(args, sorted(cpus))
    except ValueError:
        problems.append(f"--api-cpus wants a comma list of CPUs, got {args.api_cpus!r}")
        args.api_cpu_list = []
    problems += [f"--api-cpus: {c} is not one of this machine's CPUs {sorted(cpus)}" for c in args.api_cpu_list
                 if c not in cpus]
    if args.rank_cpu < 0:
        args.rank_cpu = args.client_cpu
    for name in ("head_cpu", "client_cpu", "rank_cpu"):
        if getattr(args, name) not in cpus:
            problems.append(f"--{name.replace('_', '-')} {getattr(args, name)} is not one of this machine's CPUs "
                            f"{sorted(cpus)}")
    if problems:
        print(f"eep-hpc bench-head: {problems[0]}", file=sys.stderr)
        return 2
    runs = []
    try:
        for steps in points:
            run = bench_point(args, steps)
            runs.append(run)
            print(summary_line(run), file=sys.stderr)
    except HeadBenchError as e:
        print(f"eep-hpc bench-head: {e}", file=sys.stderr)
        return 2
    result = {"date": datetime.now().astimezone().isoformat(timespec="seconds"), "command": shlex.join(sys.argv),
              "cpu": cpu_model(), "runs": runs}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = write_result(result, args.result_file or Path(args.run_dir) / f"bench-head-{stamp}.json")
    print(f"result written to {path}")
    return 0 if all(r["failed"] == 0 and all(e["phase"] == "DONE" for e in r.get("scale_plan", [])) for r in runs
                    ) else 1


def api_cpus(args: argparse.Namespace, cpus: list[int]) -> list[int]:
    """The CPUs of the API processes after the head's: --api-cpus, or the next CPUs after --head-cpu in turn."""
    if args.api_cpus:
        found = [int(c) for c in args.api_cpus.split(",")]
    else:
        start = cpus.index(args.head_cpu) if args.head_cpu in cpus else 0
        found = [cpus[(start + k) % len(cpus)] for k in range(1, args.api_servers)]
    return (found * args.api_servers)[: args.api_servers - 1]


def summary_line(run: dict) -> str:
    apis = f", {run['api_servers']} API processes" if run["api_servers"] > 1 else ""
    per_process = zip(run["api_tok_s"], run["api_cpu_us_per_own_token"])
    return (f"bench-head: {run['ranks']} ranks x {run['steps_per_s']:g} steps/s, {run['streams']} streams{apis}: "
            f"{run['delivered_tok_s']:,.0f} tok/s delivered ({run['delivered_tok_s_middle']:,.0f} in the middle half) "
            f"of {run['offered_tok_s']:,.0f} offered, "
            f"added delay p50 {run['added_delay_ms']['p50']:.2f} ms p99 {run['added_delay_ms']['p99']:.2f} ms "
            f"(head's part p50 {run['head_added_delay_ms']['p50']:.2f} ms p99 {run['head_added_delay_ms']['p99']:.2f} ms), "
            f"head CPU {run['head_cpu_us_per_token']:.1f} us/token ({run['head_cpu_util']:.0%}), "
            + (f"API CPU {run['api_cpu_us_per_token']:.1f} us/token "
               f"({', '.join(f'{u:.0%}' for u in run['api_cpu_util'])}), per process "
               f"{', '.join(f'{t:,.0f} tok/s at {c:.1f} us/token' for t, c in per_process)}, "
               if run["api_servers"] > 1 else "") +
            f"client CPU {run['client_cpu_util']:.0%}, {run['failed']} failed"
            + "".join(f", {e['kind']} {e['phase']}" for e in run["scale_events"])
            + "".join(f"; {e['kind']}@{e['at_s']:g} s: {e['phase']} in {e['took_s']:.2f} s, longest gap "
                      f"{e['longest_gap_ms']:.0f} ms" for e in run.get("scale_plan", [])))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


# ---- the head and its processes ---------------------------------------------------------------------------


def accepted_by(pids: list[int], port: int) -> dict[int, int]:
    """Open TCP connections to local `port` -> which of `pids` holds the server side: {client port: pid}."""
    owner = {}
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()  # sl, local address, remote address, state, ..., inode (field 9)
            if f[9] in owner and int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01":
                found[int(f[2].rsplit(":", 1)[1], 16)] = owner[f[9]]
    return found


class ConnectionWatch:
    """Samples, every `period_s` while running, which API process holds each client connection."""

    def __init__(self, pids: list[int], port: int, period_s: float = 0.5):
        self.pids, self.port, self.period_s = pids, port, period_s
        self.owner: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.wait(0.05 if time.monotonic() - start < 2.0 else self.period_s):  # often while they
            self.owner.update(accepted_by(self.pids, self.port))  # connect (a short load may be over in a second)

    def __enter__(self) -> "ConnectionWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads; NaN once it is gone (a rank the head declared lost)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pin(pid: int, cpu: int, nice: int = 0) -> None:
    """Every thread of `pid` onto `cpu` (threads started later inherit it), at niceness `nice` if not 0."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), {cpu})
            if nice:
                os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            raise HeadBenchError(f"cannot pin or renice process {pid}: {e}") from None


class HeadUnderTest:
    def __init__(self, args: argparse.Namespace, steps_per_s: float, run_dir: Path, emit_dir: Path):
        self.run_dir = run_dir
        max_batch = args.max_batch or -(-args.streams // args.standin_ranks)
        sets = [f"parallel.rank_engine=\"standin\"", f"parallel.ranks={args.standin_ranks}",
                f"standin.steps_per_s={steps_per_s}", f"standin.emit_log=\"{emit_dir}\"",
                f"serve.write_log=\"{emit_dir}\"",
                f"engine.max_num_seqs={max_batch}", f"serve.api_servers={args.api_servers}", *args.set]
        self.cmd = [sys.executable, "-m", "eep_hpc.cli", "serve", "--port", "0", "--run-dir", str(run_dir)]
        for s in sets:
            self.cmd += ["--set", s]
        self.max_batch = max_batch
        self.proc: subprocess.Popen | None = None
        self.log = run_dir / "head.log"

    def api_pids(self) -> list[int]:
        """The head's other API processes (serve.api_servers > 1), in start order."""
        pids = []
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        for pid in sorted(map(int, children)):
            if b"eep_hpc.serve.api_process" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        return pids

    def start(self, timeout_s: float = 300.0) -> tuple[str, list[int]]:
        """-> (API URL, the ranks' pids)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "head.json").unlink(missing_ok=True)
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not (self.run_dir / "head.json").is_file():
            if self.proc.poll() is not None:
                raise HeadBenchError(f"the head exited with code {self.proc.returncode}; its log: {self.log}")
            if time.monotonic() > deadline:
                raise HeadBenchError(f"the head did not start in {timeout_s:.0f} s; its log: {self.log}")
            time.sleep(0.2)
        url = json.loads((self.run_dir / "head.json").read_text())["api_url"]
        state = httpx.get(f"{url}/admin/state", timeout=30).json()
        return url, [r["pid"] for r in state["ranks"]]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the load -------------------------------------------------------------------------------------------


def prompt_ids(vocab_size: int, n: int) -> list[int]:
    """Ids from the upper half of the vocabulary (byte-level BPE merges: each decodes to text of its own)."""
    lo = vocab_size // 2
    return [lo + 3 + (7 * i) % (vocab_size // 2 - 16) for i in range(n)]


def piece_chars(url: str, model: str, prompt: list[int]) -> list[int]:
    """The characters of each of the stand-in's output tokens (the prompt's, in order), so that a client can count
    the tokens of an event that carries several."""
    return [len(p) for p in piece_texts(url, model, prompt)]


def expected_text(pieces: list[str], n: int) -> str:
    """What a stand-in streams for a request of n tokens: the prompt's tokens over again."""
    return "".join(pieces[k % len(pieces)] for k in range(n))


def piece_texts(url: str, model: str, prompt: list[int]) -> list[str]:
    """The text of each of the stand-in's output tokens (the prompt's, in order), from the texts of non-streamed
    requests of 1, 2, ... len(prompt) tokens (stand-ins give no logprobs)."""
    async def texts() -> list[str]:
        async with httpx.AsyncClient(timeout=120) as client:
            async def one(n: int) -> str:
                body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True}
                r = await client.post(f"{url}/v1/completions", json=body)
                r.raise_for_status()
                return r.json()["choices"][0]["text"]

            return list(await asyncio.gather(*(one(n) for n in range(1, len(prompt) + 1))))

    got = asyncio.run(texts())
    pieces = [b[len(a):] for a, b in zip(["", *got], got)]
    if not all(pieces) or not all(b.startswith(a) for a, b in zip(got, got[1:])):
        raise HeadBenchError(f"the prompt's tokens do not each decode to text of their own: {got[-1]!r}")
    return pieces


async def load(url: str, model: str, prompt: list[int], streams: int, output_len: int, rounds: int,
               pieces: list[int] | None = None, during=None, keep_text: bool = False
               ) -> tuple[list[StreamResult], float, float, object]:
    """`streams` connections, each `rounds` requests in a row; the first request of stream i has
    ceil((i + 1) * output_len / streams) tokens, so that requests do not all end at the same step. `pieces`: the
    characters of each output token (piece_chars), to count events that carry several tokens. `during`: an async
    function of (perf_counter, time.time() at the start), run alongside; until it returns, every stream goes on
    past `rounds`. -> (results, seconds from the first request to the last [DONE], time.time() at the start,
    what `during` returned)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    results: list[StreamResult] = []
    more = asyncio.Event()  # set: `during` is over (or there is none)

    async def one_stream(i: int) -> None:
        conn = Connection(host, int(port))
        try:
            k = 0
            while k < rounds or not more.is_set():
                n = -(-(i + 1) * output_len // streams) if k == 0 else output_len
                body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0.0, "ignore_eos": True,
                        "stream": True, "stream_options": {"include_usage": True}}
                result = await conn.complete(body, keep_text=keep_text, piece_chars=pieces)
                result.stream = i
                results.append(result)
                k += 1
        finally:
            conn.close()

    async def side(start: float, wall: float):
        try:
            return await during(start, wall)
        finally:
            more.set()

    if during is None:
        more.set()
    start, wall = time.perf_counter(), time.time()
    side_task = asyncio.create_task(side(start, wall)) if during is not None else None
    await asyncio.gather(*(one_stream(i) for i in range(streams)))
    side_result = await side_task if side_task is not None else None
    return results, time.perf_counter() - start, wall, side_result


def middle_rate(results: list[StreamResult], start: float, duration: float) -> float:
    lo, hi = start + duration / 4, start + 3 * duration / 4
    return sum(int(np.count_nonzero((t >= lo) & (t < hi))) for t in (np.asarray(r.received_at) for r in results)
               ) / (duration / 2)


def read_emit_times(emit_dir: Path, pattern: str = "rank-*.jsonl") -> dict[str, list[float]]:
    """Per engine request id, the stand-in ranks' emit times (or, with "api-*.jsonl", the API processes' send
    times: serve/write_log.py)."""
    out = {}
    for path in emit_dir.glob(pattern):
        for line in path.read_text().splitlines():
            rid, times = json.loads(line)
            out[rid] = times
    return out


def added_delays(results: list[StreamResult], emitted: dict[str, list[float]]) -> np.ndarray:
    """Received minus emitted, per token (prompt ids that decode to text each: a token arrived with the event that
    completed its text)."""
    delays = []
    for r in results:
        times = emitted.get(f"{r.request_id}-0")
        if times is None or len(times) != len(r.received_at):
            continue
        delays.append(np.asarray(r.received_at) - np.asarray(times))
    return np.concatenate(delays) if delays else np.zeros(0)


def head_delays(written: dict[str, list[float]], emitted: dict[str, list[float]]) -> np.ndarray:
    """Sent by an API process minus emitted, per token: the delay the head adds, without what its clients add."""
    delays = [np.asarray(times) - np.asarray(emitted[rid]) for rid, times in written.items()
              if rid in emitted and len(emitted[rid]) == len(times)]
    return np.concatenate(delays) if delays else np.zeros(0)


# ---- scale events under the load -------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (children, theirs, ...); [] for one that is gone."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                kids = [int(c) for c in Path(f"/proc/{p}/task/{tid}/children").read_text().split()]
            except (FileNotFoundError, ProcessLookupError):
                continue
            out += kids
            todo += kids
    return out


class RankPinner:
    """While a scale plan runs: every process the head starts (a grow's rank) goes onto the ranks' CPU, as the
    first ranks did, within `period_s` of appearing (else it would share the head's CPU, which it inherits)."""

    def __init__(self, head_pid: int, skip: list[int], cpu: int, nice: int, period_s: float = 0.1):
        self.head_pid, self.cpu, self.nice, self.period_s = head_pid, cpu, nice, period_s
        self.known = set(skip) | set(descendants(head_pid))
        self.started: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            for pid in descendants(self.head_pid):
                if pid not in self.known:
                    self.known.add(pid)
                    self.started.append(pid)
                    try:
                        pin(pid, self.cpu, self.nice)
                    except (FileNotFoundError, HeadBenchError):
                        pass

    def __enter__(self) -> "RankPinner":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


async def drive_scale_plan(url: str, plan: list[tuple[str, float]], start: float, settle_s: float,
                           recover_timeout_s: float) -> list[dict]:
    """Run `plan` ((kind, seconds into the load), parse_timed_plan) against the head at `url`; `start`: the load's
    perf_counter() at its start. -> one record per event (times in seconds since the load's start)."""
    records = []
    async with httpx.AsyncClient(timeout=600) as admin:
        stepper = ScalePlan(admin, url, [], 0.0, on_event=lambda e: None)
        stepper.start = start  # its t_s / t_done_s: since the load's start
        for kind, at in plan:
            await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
            if kind == "kill":
                record = await kill_and_recover(admin, url, start, recover_timeout_s)
            else:
                current = await stepper.ranks()
                await stepper.step(current, current + (1 if kind == "grow" else -1))
                e = stepper.events[-1]
                record = {"kind": kind, "at_s": e["t_s"], "done_s": e["t_done_s"], "took_s": e["t_done_s"] - e["t_s"],
                          "phase": e.get("phase", "?"), "head_event": e}
            record["planned_at_s"] = at
            print(f"bench-head: {kind} at {record['at_s']:.2f} s: {record['phase']} in {record['took_s']:.2f} s",
                  file=sys.stderr)
            records.append(record)
        await asyncio.sleep(settle_s)
    return records


async def kill_and_recover(admin: httpx.AsyncClient, url: str, start: float, timeout_s: float) -> dict:
    """SIGKILL the process of the member rank with the most requests in flight, then wait for the head's next
    recover event to be DONE (phase NOT_RECOVERED if it is not within `timeout_s`)."""
    async def state() -> dict | None:
        try:
            r = await admin.get(f"{url}/admin/state")
            r.raise_for_status()
            return r.json()
        except httpx.HTTPError:
            return None

    before = await state()
    seen = sum(1 for e in before["scale_events"] if e["kind"] == "recover")
    members = [r for r in before["ranks"] if r["rank_id"] in before["members"]]
    victim = max(members, key=lambda r: r.get("requests_in_flight", 0))
    t = time.perf_counter() - start
    os.kill(victim["pid"], signal.SIGKILL)
    deadline, event, after = time.perf_counter() + timeout_s, None, before
    while event is None and time.perf_counter() < deadline:
        await asyncio.sleep(0.1)
        after = await state() or after
        recovers = [e for e in after["scale_events"] if e["kind"] == "recover"][seen:]
        event = next((e for e in recovers if e["phase"] == "DONE"), None)
    done = time.perf_counter() - start
    return {"kind": "kill", "rank_id": victim["rank_id"], "pid": victim["pid"],
            "requests_in_flight": victim.get("requests_in_flight"), "at_s": round(t, 3), "done_s": round(done, 3),
            "took_s": round(done - t, 3), "phase": event["phase"] if event else "NOT_RECOVERED",
            "victim_still_member": victim["rank_id"] in after["members"], "members_after": after["members"],
            "head_event": event,  # the head's recover event (detect_s: from the rank's last message to its start)
            "recover_events": len([e for e in after["scale_events"] if e["kind"] == "recover"][seen:])}


def stream_gaps(results: list[StreamResult]) -> tuple[np.ndarray, np.ndarray]:
    """Every gap between two tokens one stream received in a row (across its requests too: a new request's wait
    for its first token is a gap its user sees): (time before, time after)."""
    by_stream: dict[int, list[float]] = {}
    for r in results:  # a stream's requests are in order
        by_stream.setdefault(r.stream, []).extend(r.received_at)
    before, after = [], []
    for times in by_stream.values():
        before += times[:-1]
        after += times[1:]
    return np.asarray(before), np.asarray(after)


def add_gaps(records: list[dict], results: list[StreamResult], wall: float) -> dict:
    """Each event's longest gap any stream saw that overlaps it (from its start to its end); -> the gaps that
    overlap no event, as percentiles (for comparison)."""
    before, after = stream_gaps(results)
    gaps = after - before
    elsewhere = np.ones(gaps.size, dtype=bool)
    for e in records:
        lo, hi = wall + e["at_s"], wall + e["done_s"]
        around = (after >= lo) & (before <= hi)
        elsewhere &= ~around
        e["longest_gap_ms"] = float(gaps[around].max() * 1e3) if around.any() else 0.0
        if around.any():  # where it was (seconds since the load's start): in the event's wait, or at its commit
            k = int(np.flatnonzero(around)[np.argmax(gaps[around])])
            e["longest_gap_from_s"], e["longest_gap_to_s"] = round(before[k] - wall, 3), round(after[k] - wall, 3)
        e["streams_gapped_over_1s"] = int(np.count_nonzero(around & (gaps > 1.0)))
    return percentiles_ms(gaps[elsewhere])


def percentiles_ms(values: np.ndarray) -> dict:
    if values.size == 0:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    ms = values * 1000.0
    return {"p50": float(np.percentile(ms, 50)), "p90": float(np.percentile(ms, 90)),
            "p99": float(np.percentile(ms, 99)), "max": float(ms.max()), "count": int(ms.size)}


def bench_point(args: argparse.Namespace, steps_per_s: float) -> dict:
    run_dir = Path(args.run_dir)
    with tempfile.TemporaryDirectory(prefix="eep-emit-") as tmp:
        emit_dir = Path(tmp)
        head = HeadUnderTest(args, steps_per_s, run_dir, emit_dir)
        try:
            url, rank_pids = head.start()
            head_pid = head.proc.pid
            pin(head_pid, args.head_cpu, args.nice)
            api_pids = head.api_pids()
            for pid, cpu in zip(api_pids, args.api_cpu_list):
                pin(pid, cpu, args.nice)
            pin(os.getpid(), args.client_cpu, args.nice)
            for pid in rank_pids:
                pin(pid, args.rank_cpu, args.nice)
            cards = httpx.get(f"{url}/v1/models", timeout=30).json()["data"]
            model, vocab = cards[0]["id"], int(cards[0].get("vocab_size") or 512)
            prompt = prompt_ids(vocab, args.input_len)
            texts = piece_texts(url, model, prompt)
            pieces = [len(p) for p in texts]
            asyncio.run(load(url, model, prompt, min(args.streams, 8), 4, 1, pieces))  # warm-up: every path once
            for f in emit_dir.glob("*"):
                f.write_bytes(b"")

            def measured_load(plan=()):
                cpu0 = {pid: cpu_seconds(pid) for pid in [head_pid, *api_pids, *rank_pids]}
                client0 = resource.getrusage(resource.RUSAGE_SELF)
                during = None
                if plan:
                    async def during(start, _wall):
                        return await drive_scale_plan(url, list(plan), start, args.scale_settle_s,
                                                      args.recover_timeout_s)
                with ConnectionWatch([head_pid, *api_pids], int(url.rsplit(":", 1)[1])) as watch, \
                        RankPinner(head_pid, [*api_pids, *rank_pids], args.rank_cpu, args.nice) as pinner:
                    results, duration, wall, records = asyncio.run(load(
                        url, model, prompt, args.streams, args.output_len, args.rounds, pieces, during,
                        keep_text=bool(plan)))
                client1 = resource.getrusage(resource.RUSAGE_SELF)
                cpu0.update({pid: 0.0 for pid in pinner.started})  # started (by a grow) during the load
                cpu = {pid: cpu_seconds(pid) - cpu0[pid] for pid in cpu0}
                client_cpu = client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime
                return results, duration, wall, cpu, client_cpu, watch.owner, records, pinner.started

            results, duration, wall, cpu, client_cpu, owner, records, started = measured_load(args.timed_plan)
            emitted = read_emit_times(emit_dir)
            written = read_emit_times(emit_dir, "api-*.jsonl")
            # an API process logs a stream's send times after its last write, which the client may have read first
            deadline = time.monotonic() + 5.0
            while len(written) < len(results) and time.monotonic() < deadline:
                time.sleep(0.05)
                written = read_emit_times(emit_dir, "api-*.jsonl")
            # what the coordinator did meanwhile: a rank it lost (silent past control.rank_timeout_s) shows here
            events = httpx.get(f"{url}/admin/state", timeout=30).json().get("scale_events", [])
            sampled = [head_pid, *api_pids][min(args.profile_api, len(api_pids))]
            profile = profile_head(sampled, measured_load, args.client_cpu) if args.profile else None
        finally:
            head.stop()
    check_text = bool(args.timed_plan)  # (the text is kept, and checked, where scale events run)
    failed = [r for r in results if not r.success or r.finish_reason != "length"
              or r.completion_tokens != r.max_tokens or len(r.received_at) != r.max_tokens
              or (check_text and r.text != expected_text(texts, r.max_tokens))]
    tokens = sum(len(r.received_at) for r in results)
    head_cpu = cpu[head_pid]
    api_cpu = [cpu[p] for p in [head_pid, *api_pids]]
    api_tokens = [sum(len(r.received_at) for r in results if owner.get(r.local_port) == p)
                  for p in [head_pid, *api_pids]]
    ranks_used = min(args.standin_ranks, args.streams)
    run = {
        "ranks": args.standin_ranks, "steps_per_s": steps_per_s, "max_batch": head.max_batch,
        "streams": args.streams, "output_len": args.output_len, "input_len": args.input_len, "rounds": args.rounds,
        "requests": len(results), "failed": len(failed),
        "failures": [f"{r.error or 'wrong output'}: {r.finish_reason}, {r.completion_tokens} tokens by usage, "
                     f"{len(r.received_at)} tokens by their text, {r.max_tokens} asked" for r in failed[:10]],
        "tokens": tokens, "tokens_asked": sum(r.max_tokens for r in results), "duration_s": duration,
        "offered_tok_s": ranks_used * min(head.max_batch, args.streams / ranks_used) * steps_per_s,
        "delivered_tok_s": tokens / duration,
        # SSE events with text per token: 1 while every stream's writer keeps up, less where queued tokens merged
        "text_events_per_token": sum(r.text_events for r in results) / max(tokens, 1),
        # the middle half of the run, past the start (all streams admitted at once) and before the tail (streams
        # ending one by one)
        "delivered_tok_s_middle": middle_rate(results, wall, duration),
        "nice": args.nice,
        "added_delay_ms": percentiles_ms(added_delays(results, emitted)),
        # the same from the API processes' own send times: the head's part of it (ZMQ, decoding, detokenizing,
        # SSE, the write), without the clients' (reading 512 sockets on a shared core)
        "head_added_delay_ms": percentiles_ms(head_delays(written, emitted)),
        "head_cpu_s": head_cpu, "head_cpu_util": head_cpu / duration,
        "head_cpu_us_per_token": head_cpu / max(tokens, 1) * 1e6,
        "api_servers": args.api_servers, "api_cpus": [args.head_cpu, *args.api_cpu_list],
        # every API process (the head's first): CPU seconds, and per token delivered by all of them
        "api_cpu_s": api_cpu, "api_cpu_util": [c / duration for c in api_cpu],
        "api_cpu_us_per_token": sum(api_cpu) / max(tokens, 1) * 1e6,
        # tokens each process streamed (its clients' connections, sampled while open; the rest: not seen), and
        # its CPU per own token: what one core of that process would pass on at most is 1e6 / that
        "api_tokens": api_tokens, "api_tokens_unattributed": tokens - sum(api_tokens),
        "api_cpu_us_per_own_token": [c / max(n, 1) * 1e6 for c, n in zip(api_cpu, api_tokens)],
        "api_tok_s": [n / duration for n in api_tokens],
        "ranks_cpu_util": sum(cpu[p] for p in [*rank_pids, *started] if cpu[p] == cpu[p]) / duration,
        "ranks_gone": [p for p in rank_pids if cpu[p] != cpu[p]],
        "processes_started": started,  # by the head during the load (a grow's rank), pinned to --rank-cpu
        "scale_events": [{k: e.get(k) for k in ("kind", "phase", "from_ranks", "to_ranks", "requests_migrated")}
                         for e in events],
        "client_cpu_util": client_cpu / duration,
        "head_command": shlex.join(head.cmd),
    }
    if records:
        run["text_checked"] = check_text
        run["scale_plan"] = records
        run["streams_seen"] = len({r.stream for r in results})
        # gaps between a stream's tokens (its requests in a row) that overlap no scale event, to compare with
        # each event's longest_gap_ms
        run["token_gap_ms_outside_events"] = add_gaps(records, results, wall)
    if profile is not None:
        run["profile"] = {"api_process": min(args.profile_api, len(api_pids)), **profile}
    return run


# ---- the profile ----------------------------------------------------------------------------------------


def profile_head(head_pid: int, measured_load, client_cpu: int, top: int = 30) -> dict:
    """py-spy's samples of the head (every thread, idle ones left out) during one more load -> the functions
    with the most samples, by own time and inclusive."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).is_file():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "head.folded"
        spy_proc = subprocess.Popen([spy, "record", "--pid", str(head_pid), "--rate", "200", "--nonblocking",
                                     "--format", "raw", "--output", str(out)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)  # attached
        pin(spy_proc.pid, client_cpu)
        measured_load()
        spy_proc.send_signal(signal.SIGINT)
        _, err = spy_proc.communicate(timeout=60)
        if not out.is_file():
            return {"error": f"py-spy wrote nothing: {err.decode(errors='replace')[-300:]}"}
        own, inclusive, total = Counter(), Counter(), 0
        for line in out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
            n = int(count)
            total += n
            own[frames[-1]] += n
            for f in set(frames):
                inclusive[f] += n
    share = lambda c: [{"function": f, "share": n / total} for f, n in c.most_common(top)]  # noqa: E731
    return {"tool": "py-spy record --rate 200 --nonblocking (idle samples not recorded)", "samples": total,
            "own": share(own), "inclusive": share(inclusive)}
