"""How ranks are started and stopped: one interface, a local backend now (submitit's LocalExecutor) and Slurm
node jobs later. The coordinator only ever sees `RankJob`s."""

from __future__ import annotations

from typing import Protocol

from eep_hpc.protocol import RankLaunch


class RankJob(Protocol):
    job_id: str

    def alive(self) -> bool: ...

    def signalled(self) -> bool:
        """The scheduler ended its job with a signal (preemption, scancel, time limit): the job reads as ended while
        its processes still have the scheduler's kill grace to hand off and exit."""
        ...

    def cancel(self) -> None: ...

    def kill(self) -> None: ...

    def started_again(self) -> None:
        """Its job came back (Slurm requeued it): forget what the scheduler said of it before."""
        ...


class Launcher(Protocol):
    def launch(self, launches: list[RankLaunch], pool: str = "") -> list[RankJob]:
        """Start these ranks (as one job of `pool` where pools exist); jobs may start much later (queued)."""
        ...

    def launch_pools(self, groups: dict[str, list[RankLaunch]]) -> list[RankJob]:
        """Several pools in one submission (a Slurm heterogeneous job)."""
        ...

    def device_for(self, index: int) -> str:
        """Device string for the index-th rank this launcher places (cpu, or cuda:N)."""
        ...
