"""Local ranks: one submitit LocalExecutor job per rank (the embedded default, no Slurm).

Each job runs `run_rank` in a fresh Python process; its stdout/stderr land in the run directory's jobs/ folder.
Ranks use one GPU each where GPUs exist (device "auto"/"cuda"), else the CPU.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import submitit
import torch

from eep_hpc.rank.process import run_rank
from eep_hpc.protocol import RankLaunch


class LocalRankJob:
    def __init__(self, job: submitit.local.local.LocalJob):
        self.job = job
        self.job_id = f"local-{job.job_id}"

    def alive(self) -> bool:
        return self.job.state == "RUNNING"

    def signalled(self) -> bool:
        """A local job's end is its process's: nothing outlives it."""
        return False

    def cancel(self) -> None:
        if self.alive():
            self.job.cancel()

    def started_again(self) -> None:
        """A local job is never requeued: nothing to forget."""

    def pids(self) -> list[int]:
        """The job's controller process and the rank process under it."""
        proc = self.job._process
        if proc is None or proc.poll() is not None:
            return []
        return [proc.pid, *child_pids(proc.pid)]

    def kill(self) -> None:
        """SIGKILL without notice (the rank gets no chance to hand anything off)."""
        for pid in reversed(self.pids()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.job._process is not None:
            self.job._process.wait()


def child_pids(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


class LocalLauncher:
    def __init__(self, run_dir: str | Path, device: str = "auto"):
        self.folder = Path(run_dir) / "jobs"
        self.folder.mkdir(parents=True, exist_ok=True)
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.num_gpus = torch.cuda.device_count() if use_cuda else 0
        if device == "cuda" and self.num_gpus == 0:
            raise RuntimeError("device = 'cuda' but no CUDA GPU is visible")
        self.gpu_of: dict[int, tuple[int, LocalRankJob]] = {}  # rank id -> (gpu, its job)

    def device_for(self, index: int) -> str:
        # each rank sees only its own GPU (CUDA_VISIBLE_DEVICES set per job), so it is always cuda:0
        return "cuda:0" if self.num_gpus else "cpu"

    def launch(self, launches: list[RankLaunch], pool: str = "") -> list[LocalRankJob]:
        """`pool` names Slurm node shapes; local ranks have one shape, so it is ignored."""
        with sigint_ignored_in_children():
            return [self._submit(launch) for launch in launches]

    def launch_pools(self, groups: dict[str, list[RankLaunch]]) -> list[LocalRankJob]:
        return self.launch([launch for launches in groups.values() for launch in launches])

    def _submit(self, launch: RankLaunch) -> LocalRankJob:
        executor = submitit.LocalExecutor(folder=self.folder)
        gpu = self._least_used_gpu() if self.num_gpus else None
        executor.update_parameters(timeout_min=60 * 24 * 365,
                                   **({"gpus_per_node": 1, "visible_gpus": [gpu]} if gpu is not None else {}))
        job = LocalRankJob(executor.submit(run_rank, launch))
        if gpu is not None:
            self.gpu_of[launch.rank_id] = (gpu, job)
        return job

    def _least_used_gpu(self) -> int:
        """A GPU with the fewest live ranks (two ranks on one GPU cannot share an NCCL group)."""
        users = [0] * self.num_gpus
        for gpu, job in self.gpu_of.values():
            if job.alive():
                users[gpu] += 1
        return min(range(self.num_gpus), key=lambda g: (users[g], g))


@contextlib.contextmanager
def sigint_ignored_in_children():
    """Ctrl-C in a terminal reaches the whole foreground process group; the head alone should act on it (and stop
    its ranks in order). Children inherit an ignored SIGINT, and Python then installs no KeyboardInterrupt."""
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: nothing to protect
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
