"""The head's liveness check against what the scheduler says of a rank's job (head/health.py): a job that ended
plainly fails its rank at once; one that Slurm ended with a signal (preemption, scancel) while the rank still talks
leaves the rank to its node agent's notice and drain, and fails it only once it falls silent."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

from eep_hpc.head.health import SIGNALLED_GRACE_S, Health
from eep_hpc.head.membership import Membership, RankRecord, RankState

HEARTBEAT_S = 1.0


class EndedJob:
    job_id = "42"

    def __init__(self, signalled: bool) -> None:
        self._signalled, self.killed = signalled, False

    def alive(self) -> bool:
        return False

    def signalled(self) -> bool:
        return self._signalled

    def kill(self) -> None:
        self.killed = True


def check(job: EndedJob, silent_for_s: float, signalled_for_s: float | None = None) -> tuple[RankState, list[int]]:
    """One liveness check of a serving member whose job ended and who last spoke `silent_for_s` ago (the head first
    saw its job signalled `signalled_for_s` ago, if given) -> its state and the recoveries started."""
    m = Membership("/nonexistent")
    rec = RankRecord(rank_id=3, job=job, state=RankState.READY, last_seen=time.monotonic() - silent_for_s)
    m.ranks[3], m.members = rec, [3]
    recoveries: list[int] = []
    link = SimpleNamespace(beacon=SimpleNamespace(ping_only=lambda ranks: list(ranks)))
    health = Health(m, link, streams=None, heartbeat_s=HEARTBEAT_S, rank_timeout_s=5.0, head_timeout_s=15.0,
                    on_member_lost=lambda: recoveries.append(3) or True)
    if signalled_for_s is not None:
        health.signalled_at[3] = time.monotonic() - signalled_for_s
    asyncio.run(health.check_alive())
    return rec.state, recoveries


def test_a_job_that_ended_plainly_fails_its_rank_at_once():
    job = EndedJob(signalled=False)
    assert check(job, silent_for_s=0.0) == (RankState.FAILED, [3]) and job.killed


def test_a_signalled_job_whose_rank_still_talks_leaves_the_rank_to_its_notice():
    job = EndedJob(signalled=True)
    assert check(job, silent_for_s=0.1) == (RankState.READY, []) and not job.killed


def test_a_signalled_job_whose_rank_fell_silent_fails_it():
    job = EndedJob(signalled=True)
    assert check(job, silent_for_s=3 * HEARTBEAT_S) == (RankState.FAILED, [3]) and job.killed


def test_a_signalled_job_whose_rank_talks_on_past_any_kill_grace_fails_it():
    job = EndedJob(signalled=True)
    assert check(job, silent_for_s=0.1, signalled_for_s=SIGNALLED_GRACE_S + 1) == (RankState.FAILED, [3])
