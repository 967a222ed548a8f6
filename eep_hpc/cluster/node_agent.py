"""The node agent: what a Slurm node job runs on each of its nodes (one srun task per node, via submitit).

It starts the ranks the head assigned to its node (rank ids are fixed before submission) as child processes, one
per GPU (or `ranks_per_node` on a CPU node), and turns the scheduler's signals into a notice for the coordinator:

- SIGUSR2 (walltime warning, `--signal=USR2@warning_s`): "my ranks leave in warning_s seconds";
- SIGTERM (scancel, preemption, the time limit): "my ranks leave in KillWait seconds" (Slurm's grace before
  SIGKILL; a preempted job may get GraceTime more, so this is a lower bound).

The notice is a `protocol.NodeLeaving` message, signed with the run's secret (read from control.secret_file at
start), on a ZMQ DEALER (identity `agent-<job id>-<node index>-<suffix>`) to the head's address. Ranks start with
both signals ignored (Slurm signals every process of the step; the node's notice is the agent's to give): the head
drains them (shrink) and tells them Shutdown. The agent waits for its ranks to exit and returns; if they are still running
shortly before Slurm's SIGKILL, it kills them itself so that it still ends cleanly (exit 0).

    python -m eep_hpc.cluster.node_agent --rank     (internal) one rank: a RankLaunch as msgpack on stdin
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import msgspec
import zmq

from eep_hpc import protocol as P
from eep_hpc import signing
from eep_hpc.logs import setup_logging
from eep_hpc.protocol import RankLaunch

log = logging.getLogger("eep_hpc.node_agent")

SCHEDULER_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)
KILL_MARGIN_S = 1.5  # kill leftover ranks this long before Slurm would SIGKILL the whole step


class NodePlan(msgspec.Struct, kw_only=True):
    """What one node of a node job runs: the ranks the head assigned to it."""

    pool: str
    launches: list[RankLaunch]
    gpus: int = 0  # GPUs the pool gives each node
    cpus: int = 0  # CPUs of the node-agent task (0 = unknown)
    warning_s: int = 0  # the pool's walltime warning (--signal=USR2@warning_s)


class AgentResult(msgspec.Struct, kw_only=True):
    """What the agent returns (submitit pickles it as the task's result)."""

    node: str
    rank_ids: list[int]
    exit_codes: list[int | None]
    signals: list[str]  # scheduler signals received, in order
    notified: int  # NodeLeaving messages sent


def run_node_agent(plans: list[NodePlan]) -> AgentResult:
    """Entry point of one node of a node job (submitit runs it once per srun task, one task per node)."""
    setup_logging("%(asctime)s node-agent %(levelname)s %(message)s")
    index = int(os.environ.get("SLURM_PROCID", "0"))
    if index >= len(plans):
        raise RuntimeError(f"node index {index} but the job carries plans for {len(plans)} node(s)")
    # the run's secret signs its notices; the head's file, never a pickled copy (submitit's job files hold the path)
    signing.use_secret(signing.read_secret(plans[index].launches[0].config.control.secret_file))
    return NodeAgent(plans[index]).run()


class NodeAgent:
    def __init__(self, plan: NodePlan):
        self.plan = plan
        self.job_id = os.environ.get("SLURM_JOB_ID", "local")
        self.node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        self.index = int(os.environ.get("SLURM_PROCID", "0"))
        self.rank_ids = [launch.rank_id for launch in plan.launches]
        self.procs: list[subprocess.Popen] = []
        self.signals: list[str] = []
        self.notified = 0
        self.deadline: float | None = None  # monotonic time by which the ranks must be gone
        self._pending: list[int] = []  # signals caught, not handled yet (the handler only records them)
        self._sock: zmq.Socket | None = None

    # ---- lifecycle ----------------------------------------------------------------------------------------------

    def run(self) -> AgentResult:
        for sig in SCHEDULER_SIGNALS:
            signal.signal(sig, self._on_signal)
        kill_wait = slurm_kill_wait_s()
        log.info("job %s node %s (%d): starting ranks %s of pool %s", self.job_id, self.node, self.index,
                 self.rank_ids, self.plan.pool)
        try:
            self.procs = [self._start_rank(i, launch) for i, launch in enumerate(self.plan.launches)]
            while any(p.poll() is None for p in self.procs):
                time.sleep(0.2)
                while self._pending:
                    self._handle(self._pending.pop(0), kill_wait)
                if self.deadline is not None and time.monotonic() > self.deadline - KILL_MARGIN_S:
                    self._kill_ranks("they did not exit before the scheduler's deadline")
                    break
        finally:
            self._kill_ranks("the agent is exiting")
            if self._sock is not None:
                self._sock.close(linger=1000)
        codes = [p.poll() for p in self.procs]
        log.info("ranks %s exited with %s", self.rank_ids, codes)
        return AgentResult(node=self.node, rank_ids=self.rank_ids, exit_codes=codes, signals=self.signals,
                           notified=self.notified)

    def _start_rank(self, slot: int, launch: RankLaunch) -> subprocess.Popen:
        env = dict(os.environ)
        device = launch.device
        if device == "auto":
            device = "cuda:0" if self.plan.gpus else "cpu"
        if device.startswith("cuda"):
            # one GPU per rank: the slot-th of the GPUs Slurm gave this job (or of all, without gres binding)
            visible = [g for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g]
            gpus = visible or [str(g) for g in range(max(self.plan.gpus, 1))]
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
            device = "cuda:0"
        env["EEP_HPC_NODE_AGENT"] = f"{self.job_id}-{self.index}"  # the agent speaks for this rank to the head
        if self.plan.cpus and "EEP_HPC_RANK_THREADS" not in env:
            env["EEP_HPC_RANK_THREADS"] = str(max(1, self.plan.cpus // len(self.plan.launches)))
        launch = msgspec.structs.replace(launch, device=device)
        # preexec_fn is safe here: the agent has no other threads yet (its ZMQ socket is made on the first notice)
        proc = subprocess.Popen([sys.executable, "-m", "eep_hpc.cluster.node_agent", "--rank"], env=env,
                                stdin=subprocess.PIPE, preexec_fn=_rank_preexec)
        proc.stdin.write(msgspec.msgpack.encode(launch))
        proc.stdin.close()
        return proc

    def _kill_ranks(self, why: str) -> None:
        running = [p for p in self.procs if p.poll() is None]
        if running:
            log.warning("killing ranks (pids %s): %s", [p.pid for p in running], why)
        for p in running:
            p.kill()
        for p in running:
            p.wait()

    # ---- scheduler signals --------------------------------------------------------------------------------------

    def _on_signal(self, signum, frame) -> None:
        self._pending.append(signum)  # nothing else here: handled by the main loop within 0.2 s

    def _handle(self, signum: int, kill_wait: float) -> None:
        name = signal.Signals(signum).name
        repeated = name in self.signals  # e.g. SIGTERM from slurmstepd and again forwarded by srun
        self.signals.append(name)
        if repeated:
            return
        if signum == signal.SIGUSR2:
            seconds, reason = float(self.plan.warning_s), f"walltime warning (SIGUSR2) on {self.node}"
        else:
            seconds, reason = kill_wait, f"SIGTERM (scancel, preemption or time limit) on {self.node}"
        deadline = time.monotonic() + seconds
        if signum == signal.SIGTERM:  # USR2 is a warning: the TERM at the time limit sets the real deadline
            self.deadline = deadline if self.deadline is None else min(self.deadline, deadline)
        log.warning("got %s: ranks %s leave in %.0f s; telling the head", name, self.rank_ids, seconds)
        self.notify(P.NodeLeaving(job_id=self.job_id, rank_ids=self.rank_ids, seconds=seconds, reason=reason))

    def notify(self, msg) -> None:
        if self._sock is None:
            address = self.plan.launches[0].head_address
            self._sock = zmq.Context.instance().socket(zmq.DEALER)
            self._sock.setsockopt(zmq.IDENTITY, agent_identity(self.job_id, self.index))
            self._sock.connect(address)
        self._sock.send(signing.encode(msg), copy=False)
        self.notified += 1


def agent_identity(job_id: str, node_index: int) -> bytes:
    """Unguessable without the run's secret, so nobody can take it on the head's socket before the agent."""
    return f"agent-{job_id}-{node_index}-{signing.identity_suffix()}".encode()


def slurm_kill_wait_s(default: float = 30.0) -> float:
    """Slurm's KillWait: seconds between SIGTERM and SIGKILL when a job is cancelled or runs out of time."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return default
    for line in out.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "KillWait":
            try:
                return float(value.split()[0])
            except (ValueError, IndexError):
                break
    return default


# ---- one rank (a child of the agent) ----------------------------------------------------------------------------


def _rank_preexec() -> None:
    """In the forked child before exec: scheduler signals ignored from the first instruction (dispositions set to
    SIG_IGN survive exec), and SIGKILL when the agent dies (PR_SET_PDEATHSIG), so no rank outlives its node job."""
    for sig in (*SCHEDULER_SIGNALS, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def rank_child_main() -> int:
    launch = msgspec.msgpack.decode(sys.stdin.buffer.read(), type=RankLaunch)
    from eep_hpc.rank.process import run_rank

    return run_rank(launch)


if __name__ == "__main__":
    if sys.argv[1:] == ["--rank"]:
        sys.exit(rank_child_main())
    sys.exit(__doc__)
