"""Ranks in Slurm node jobs, submitted through submitit.

One `launch` is one node job: the ranks of one pool (cluster/pools.py) packed ranks_per_node to a node, submitted
with `--nodes=ceil(N / ranks_per_node)` and the pool's partition, time limit, GPUs, CPUs, memory, account, QOS,
constraint and walltime warning (`--signal=USR2@warning_s`). Ranks of several pools in one `launch_pools` call
become one heterogeneous job (`#SBATCH hetjob` between the components, one `srun --het-group=0-K` step over all
nodes): they start together or not at all. submitit has no heterogeneous jobs (facebookincubator/submitit#1741), so
`NodeJobExecutor` extends its SlurmExecutor at the script text and keeps the rest of submitit: pickled function,
per-job folder, logs, results, and job states read through sacct.

Every node runs one srun task: `node_agent.run_node_agent(plans)`, which starts the node's ranks (plan index =
SLURM_PROCID, one task per node across all components). Rank ids are assigned by the head before submission.

A RankJob stays alive while its node job is PENDING: `pending()` says the ranks have not started yet (a grow may
wait for them minutes or hours). The job's state comes from sacct, refreshed at most every few seconds.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob, _make_sbatch_string

from eep_hpc.cluster.node_agent import NodePlan, run_node_agent
from eep_hpc.cluster.pools import Pool
from eep_hpc.protocol import RankLaunch

log = logging.getLogger("eep_hpc.slurm")

# Slurm job states in which the job's processes may still run (or will: PENDING); every other state is final.
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
               "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "READY", "UNKNOWN"}
# Ends Slurm reaches by signalling the job (SIGTERM, KillWait later SIGKILL): sacct may show them before the
# processes are gone, while a node agent's notice of the same signal is still on its way to the head.
SIGNALLED_STATES = {"PREEMPTED", "CANCELLED", "TIMEOUT", "DEADLINE"}
NOT_STARTED_STATES = {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
# sbatch options that belong to the whole job: written in the first het component only.
JOB_WIDE_FLAGS = {"job-name", "output", "error", "open-mode", "wckey", "comment", "mail-type", "mail-user",
                  "dependency", "array"}


class NodeJobWatcher(SlurmInfoWatcher):
    """submitit's sacct watcher, refreshed every few seconds rather than every 10 minutes, that also reads
    heterogeneous jobs: sacct lists their components as ID+0, ID+1, …; the job ID takes component 0's state."""

    def read_info(self, string):
        info = super().read_info(string)
        for key, stats in list(info.items()):
            leader, plus, component = key.partition("+")
            if plus and component == "0":
                info[leader] = stats
        return info


class NodeJob(SlurmJob):
    watcher = NodeJobWatcher(delay_s=5)


class NodeJobExecutor(submitit.SlurmExecutor):
    """A SlurmExecutor for node jobs of one pool, or of several as one heterogeneous job.

    `components`: submitit sbatch parameters per het component (the first also carries the job-wide ones).
    """

    job_class = NodeJob

    def __init__(self, folder: str | Path, components: list[dict], python: str | None = None):
        super().__init__(folder, python=python)
        if not components:
            raise ValueError("a node job needs at least one component")
        self.components = [dict(c) for c in components]
        first = dict(self.components[0])
        if len(self.components) > 1:
            first["srun_args"] = [*first.get("srun_args", []), f"--het-group=0-{len(self.components) - 1}"]
        self.update_parameters(**first)
        for c in self.components[1:]:
            _make_sbatch_string(command="", folder=self.folder, **c)  # unknown parameters fail here, not at sbatch

    def _make_submission_file_text(self, command: str, uid: str) -> str:
        text = super()._make_submission_file_text(command, uid)
        if len(self.components) == 1:
            return text
        lines = text.split("\n")
        last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
        extra = []
        for c in self.components[1:]:
            extra.append("#SBATCH hetjob")
            rendered = _make_sbatch_string(command="", folder=self.folder, **c).split("\n")
            extra += [line for line in rendered if line.startswith("#SBATCH") and _flag(line) not in JOB_WIDE_FLAGS]
        lines[last + 1:last + 1] = extra
        # In components after the first, srun's %j is that component's own job id (leader + K), whose folder does
        # not exist: name the leader's id, which SLURM_JOB_ID holds in the batch script.
        return "\n".join(line.replace("%j", "${SLURM_JOB_ID}") if line.startswith("srun ") else line
                         for line in lines)

    def _num_tasks(self) -> int:
        return sum(c.get("nodes", 1) * max(1, c.get("ntasks_per_node") or 1) for c in self.components)


def _flag(line: str) -> str:
    return line.removeprefix("#SBATCH --").split("=", 1)[0]


def node_job_parameters(pool: Pool, nodes: int, job_name: str) -> dict:
    """submitit SlurmExecutor parameters for `nodes` nodes of `pool`, one node-agent task per node."""
    p: dict = {"job_name": job_name, "nodes": nodes, "ntasks_per_node": 1, "time": pool.time_limit_min,
               "signal_delay_s": pool.warning_s, "stderr_to_stdout": True}
    optional = {"partition": pool.partition, "gpus_per_node": pool.gpus_per_node, "cpus_per_task": pool.cpus_per_node,
                "account": pool.account, "qos": pool.qos, "constraint": pool.constraint}
    p.update({k: v for k, v in optional.items() if v})
    if pool.mem_gb:
        p["mem"] = f"{int(pool.mem_gb)}GB" if pool.mem_gb == int(pool.mem_gb) else f"{int(pool.mem_gb * 1024)}MB"
    if pool.sbatch:
        p["additional_parameters"] = {k.replace("_", "-"): v for k, v in pool.sbatch.items()}
    # Slurm signals the batch shell too; a trapped TERM keeps it waiting for the agents to finish their hand-off.
    p["setup"] = ["trap 'echo eep-hpc: batch shell got SIGTERM, waiting for the node agents >&2' TERM", *pool.setup]
    return p


class NodeJobHandle:
    """One Slurm node job shared by the ranks it runs; cancelled once all of them were cancelled or killed."""

    def __init__(self, job: NodeJob, rank_ids: list[int], pools: list[str]):
        self.job, self.rank_ids, self.pools = job, set(rank_ids), pools
        self.released: set[int] = set()

    @property
    def job_id(self) -> str:
        return self.job.job_id

    def state(self) -> str:
        """The Slurm state (RUNNING, PENDING, COMPLETED, CANCELLED, …; UNKNOWN until sacct knows the job)."""
        return (self.job.state or "UNKNOWN").split()[0].upper()

    def alive(self) -> bool:
        return self.state() in LIVE_STATES

    def started_again(self) -> None:
        """The job runs again (requeued). submitit stops asking sacct about a job once it saw a final state, which
        a requeued job passes through (the first run's end): its cache is cleared, so the next state is asked
        afresh (one sacct call over every job this head knows)."""
        self.job.watcher.clear()
        self.released.clear()

    def release(self, rank_id: int, kill: bool) -> None:
        self.released.add(rank_id)
        if self.released >= self.rank_ids and self.alive():
            scancel(self.job_id, kill=kill)


class SlurmRankJob:
    """One rank of a node job, as the coordinator sees it (cluster/launcher.py's RankJob)."""

    def __init__(self, node_job: NodeJobHandle, rank_id: int):
        self.node_job, self.rank_id = node_job, rank_id
        self.job_id = node_job.job_id

    def alive(self) -> bool:
        """True while the node job is pending or running (a pending rank is on its way, not dead)."""
        return self.node_job.alive()

    def signalled(self) -> bool:
        return self.node_job.state() in SIGNALLED_STATES

    def pending(self) -> bool:
        """True while the node job waits in the queue: the rank has not started and cannot say hello yet."""
        return self.node_job.state() in NOT_STARTED_STATES

    def cancel(self) -> None:
        """Give this rank back; the node job is cancelled (SIGTERM to its agent) once all its ranks are."""
        self.node_job.release(self.rank_id, kill=False)

    def started_again(self) -> None:
        self.node_job.started_again()

    def kill(self) -> None:
        """Like cancel, but the node job gets SIGKILL (no hand-off)."""
        self.node_job.release(self.rank_id, kill=True)


def scancel(job_id: str, kill: bool = False) -> None:
    if kill:
        run(["scancel", "--full", "--signal=KILL", job_id], check=False)
    run(["scancel", job_id], check=False)


def run(cmd: list[str], check: bool = True, timeout_s: float = 60) -> str:
    """Run a Slurm command; raise with the command, exit code, stdout and stderr when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}\nstdout: {proc.stdout.strip()}\n"
                           f"stderr: {proc.stderr.strip()}")
    if proc.returncode != 0:
        log.warning("%s exited with %d: %s", " ".join(cmd), proc.returncode, proc.stderr.strip())
    return proc.stdout


class SlurmLauncher:
    """Launcher (cluster/launcher.py) whose ranks run in Slurm node jobs, one node job per launch."""

    def __init__(self, run_dir: str | Path, pools: dict[str, Pool], default_pool: str = "", device: str = "auto",
                 python: str | None = None):
        if not pools:
            raise ValueError("SlurmLauncher needs at least one pool ([pools.NAME] in the config)")
        self.pools = pools
        self.default_pool = default_pool or next(iter(pools))
        self._check_pool(self.default_pool)
        self.device = device
        self.python = python
        # One folder per job (submitit replaces %j): the job script, pickles, the agent's and its ranks' log.
        # It must be visible from the compute nodes (a shared filesystem on a real cluster).
        self.folder = Path(run_dir).resolve() / "slurm" / "%j"
        self.jobs: list[NodeJobHandle] = []

    def _check_pool(self, name: str) -> Pool:
        if name not in self.pools:
            raise ValueError(f"unknown pool {name!r}; pools: {', '.join(self.pools)}")
        return self.pools[name]

    def device_for(self, index: int) -> str:
        # "auto": the node agent decides (cuda:0 with the rank's one GPU visible on a GPU pool, else cpu)
        return {"cpu": "cpu", "cuda": "cuda:0"}.get(self.device, "auto")

    def launch(self, launches: list[RankLaunch], pool: str = "") -> list[SlurmRankJob]:
        return self.launch_pools({pool or self.default_pool: launches})

    def launch_pools(self, groups: dict[str, list[RankLaunch]]) -> list[SlurmRankJob]:
        """Submit one node job for these ranks (several pools: one heterogeneous job). Returns a RankJob per
        launch, in the order given."""
        groups = {name: launches for name, launches in groups.items() if launches}
        if not groups:
            return []
        components, plans, ordered = [], [], []
        for name, launches in groups.items():
            pool = self._check_pool(name)
            per_node = [launches[i:i + pool.ranks_per_node] for i in range(0, len(launches), pool.ranks_per_node)]
            first, last = launches[0].rank_id, launches[-1].rank_id
            components.append(node_job_parameters(pool, len(per_node), f"eep-{name}-r{first}-{last}"))
            plans += [NodePlan(pool=name, launches=chunk, gpus=pool.gpus_per_node, cpus=pool.cpus_per_node,
                               warning_s=pool.warning_s) for chunk in per_node]
            ordered += launches
        if len(components) > 1:
            components[0]["setup"] = list(dict.fromkeys(line for c in components for line in c["setup"]))
        executor = NodeJobExecutor(self.folder, components, python=self.python)
        job = executor.submit(run_node_agent, plans)
        handle = NodeJobHandle(job, [launch.rank_id for launch in ordered], list(groups))
        self.jobs.append(handle)
        log.info("submitted node job %s: %s", job.job_id,
                 ", ".join(f"{len(ls)} rank(s) of pool {n}" for n, ls in groups.items()))
        return [SlurmRankJob(handle, launch.rank_id) for launch in ordered]


def slurm_available() -> bool:
    """True when Slurm's commands are installed and the controller answers."""
    try:
        return subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
