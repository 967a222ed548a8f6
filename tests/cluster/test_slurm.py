"""Ranks in real Slurm node jobs (the single-host test cluster of .ci/slurm-up), and the pool definitions.

Slurm tests are skipped unless SLURM_CONF is set and `sinfo` answers:  eval "$(.ci/slurm-up)" && make test.
Most of them stand in for the head with a bare ROUTER socket, so they see exactly what node agents and ranks send;
one runs the real head with a SlurmLauncher and serves requests from ranks in node jobs.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq

from eep_hpc import protocol as P
from eep_hpc import signing
from eep_hpc.cluster.node_agent import agent_identity
from eep_hpc.cluster.pools import Pool, PoolError, load_pools, name_pools, parse_pools
from eep_hpc.config import Config, ControlConfig
from support import TEST_CONFIG, cluster_network, cluster_report, sacct, wait_sacct, why_no_slurm

NO_SLURM = why_no_slurm()
NIXL = importlib.util.find_spec("nixl") is not None
requires_slurm = pytest.mark.skipif(bool(NO_SLURM), reason=NO_SLURM)


# ---- pools (no Slurm needed) ------------------------------------------------------------------------------------


def test_pools_of_the_test_config_parse_with_defaults():
    pools = load_pools(TEST_CONFIG)
    assert set(pools) == {"big", "small", "spot"}
    big, small = pools["big"], pools["small"]
    assert (big.name, big.partition, big.gpus_per_node, big.ranks_per_node, big.warning_s) == ("big", "big", 2, 2, 60)
    assert (small.gpus_per_node, small.ranks_per_node) == (0, 1)  # one rank per CPU node by default
    assert big.nodes_for(3) == 2 and small.nodes_for(2) == 2


@pytest.mark.parametrize("table, message", [
    ({"gpus": 2}, "unknown field `gpus`; valid keys: name, partition, gpus_per_node"),
    ({"gpus_per_node": 2, "ranks_per_node": 3}, "ranks_per_node (3) exceeds gpus_per_node (2)"),
    ({"time_limit_min": 1, "warning_s": 60}, "warning_s (60) must be shorter than the time limit (1 min)"),
    ({"name": "other"}, "[pools.p] has name = 'other'"),
    ({"mem_gb": "lots"}, "Expected `float`"),
])
def test_bad_pool_is_named_with_the_reason(table, message):
    with pytest.raises(PoolError) as e:
        parse_pools({"p": table})
    assert message in str(e.value) and "pools.p" in str(e.value)


def test_pools_convert_as_a_config_field():
    """What config.Config's `pools: dict[str, Pool]` field does: msgspec converts, name_pools names."""

    class WithPools(msgspec.Struct, forbid_unknown_fields=True):
        pools: dict[str, Pool] = {}

    cfg = msgspec.convert({"pools": {"a": {"gpus_per_node": 4}}}, WithPools)
    assert name_pools(cfg.pools)["a"].name == "a" and cfg.pools["a"].ranks_per_node == 4


# ---- a stand-in head ------------------------------------------------------------------------------------------


class FakeHead:
    """A ROUTER socket where ranks and node agents connect, like the coordinator's."""

    def __init__(self, secret_file: Path):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        host = cluster_network().host_address  # where node jobs reach this host (the bridge, with namespaces)
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{port}"
        self.hellos: dict[int, P.RankHello] = {}
        # like the head: the run's secret in a file its ranks and agents read (this process signs with it)
        self.secret_file = signing.write_secret(secret_file, signing.ensure_secret())

    def launches(self, rank_ids, head_timeout_s: float = 60.0) -> list[P.RankLaunch]:
        cfg = Config(control=ControlConfig(head_timeout_s=head_timeout_s, secret_file=str(self.secret_file)))
        return [P.RankLaunch(rank_id=r, head_address=self.address, model_dir="/unused", eos_token_ids=[0],
                             device="cpu", config=cfg) for r in rank_ids]

    def recv(self, timeout_s: float = 120.0) -> tuple[bytes, bytes]:
        if not self.sock.poll(timeout_s * 1000):
            raise TimeoutError(f"nothing from ranks or agents in {timeout_s:.0f} s")
        ident, data = self.sock.recv_multipart()
        return ident, data

    def wait_hellos(self, rank_ids, job=None, timeout_s: float = 120.0) -> dict[int, P.RankHello]:
        """Wait for RankHello from these ranks; fail early, with the job's log, if its node job ended first."""
        deadline = time.monotonic() + timeout_s
        while not set(rank_ids) <= set(self.hellos):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no hello from ranks {sorted(set(rank_ids) - set(self.hellos))} in {timeout_s:.0f} s"
                                   f"\n{cluster_report()}")
            if not self.sock.poll(2000):
                if job is not None and job.node_job.job.done():
                    raise AssertionError(f"node job {job.job_id} ended before its ranks said hello:\n"
                                         f"{job.node_job.job.stdout()}")
                continue
            ident, data = self.sock.recv_multipart()
            msg = signing.decode_for_head(data)
            if isinstance(msg, P.RankAlive):  # a rank's beacon, from a socket of its own (rank/beacon.py)
                continue
            assert isinstance(msg, P.RankHello) and ident == signing.rank_identity(msg.rank_id)
            self.hellos[msg.rank_id] = msg
        return self.hellos

    def leaving_notice(self, job=None, timeout_s: float = 60.0):
        """The next NodeLeaving from a node agent (ranks may send their own; those are skipped)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.sock.poll(2000):
                if job is not None and job.node_job.job.done():
                    raise AssertionError(f"node job {job.job_id} ended without a notice:\n{job.node_job.job.stdout()}")
                continue
            ident, data = self.sock.recv_multipart()
            if ident.startswith(b"agent-"):
                return ident, signing.decode_for_head(data)
        raise TimeoutError(f"no notice from a node agent in {timeout_s:.0f} s")

    def shutdown(self, rank_ids) -> None:
        for r in rank_ids:
            self.sock.send_multipart([signing.rank_identity(r), signing.encode(P.Shutdown())])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def head(tmp_path):
    h = FakeHead(tmp_path / "control-secret")
    yield h
    h.close()


@pytest.fixture
def launcher(tmp_path):
    from eep_hpc.cluster.slurm import SlurmLauncher

    lch = SlurmLauncher(tmp_path / "run", load_pools(TEST_CONFIG), device="cpu")
    yield lch
    for job in lch.jobs:  # nothing outlives a test
        if job.alive():
            subprocess.run(["scancel", "--signal=KILL", "--full", job.job_id])
            subprocess.run(["scancel", job.job_id])


# ---- node jobs -----------------------------------------------------------------------------------------------


@pytest.mark.slurm
@requires_slurm
def test_node_job_starts_ranks_runs_then_completes(head, launcher):
    jobs = launcher.launch(head.launches([0, 1, 2]), pool="big")  # 2 ranks per node: n job of 2 nodes
    assert len({j.job_id for j in jobs}) == 1 and all(j.alive() for j in jobs)
    hellos = head.wait_hellos([0, 1, 2], jobs[0])
    job_id = jobs[0].job_id
    assert wait_sacct(job_id, job_id, {"RUNNING"})[job_id][0] == "RUNNING"
    assert all(h.device == "cpu" for h in hellos.values())
    head.shutdown([0, 1, 2])
    results = jobs[0].node_job.job.results()
    assert [(r.rank_ids, r.exit_codes) for r in results] == [([0, 1], [0, 0]), ([2], [0])]
    assert results[0].node != results[1].node  # two nodes of the big partition
    info = wait_sacct(job_id, job_id, {"COMPLETED"})
    assert info[f"{job_id}.0"] == ("COMPLETED", "0:0")
    deadline = time.monotonic() + 30
    while any(j.alive() for j in jobs):  # the launcher's own view (submitit's sacct watcher) catches up
        assert time.monotonic() < deadline, jobs[0].node_job.state()
        time.sleep(1)


@pytest.mark.slurm
@requires_slurm
def test_het_job_puts_each_pool_on_its_own_nodes(head, launcher):
    jobs = launcher.launch_pools({"big": head.launches([0, 1]), "small": head.launches([2, 3])})
    job_id = jobs[0].job_id
    assert [j.job_id for j in jobs] == [job_id] * 4
    head.wait_hellos([0, 1, 2, 3], jobs[0])
    head.shutdown([0, 1, 2, 3])
    results = jobs[0].node_job.job.results()
    by_ranks = {tuple(r.rank_ids): r for r in results}
    assert set(by_ranks) == {(0, 1), (2,), (3,)} and all(r.exit_codes == [0] * len(r.rank_ids) for r in results)
    assert by_ranks[(0, 1)].node in {"n1", "n2"}  # partition big
    assert {by_ranks[(2,)].node, by_ranks[(3,)].node} == {"n3", "n4"}  # partition small, one rank per node
    info = wait_sacct(job_id, f"{job_id}+1", {"COMPLETED"})
    assert info[f"{job_id}+0"][0] == "COMPLETED" and info[f"{job_id}+1"][0] == "COMPLETED"


@pytest.mark.slurm
@requires_slurm
def test_scancel_reaches_the_agent_as_sigterm_and_it_exits_0(head, launcher):
    jobs = launcher.launch(head.launches([5, 6]), pool="big")
    job_id = jobs[0].job_id
    head.wait_hellos([5, 6], jobs[0])
    subprocess.run(["scancel", job_id], check=True)
    ident, notice = head.leaving_notice(jobs[0])
    assert ident == agent_identity(job_id, 0)
    assert (notice.job_id, notice.rank_ids) == (job_id, [5, 6]) and notice.reason.startswith("SIGTERM")
    assert notice.seconds == 5.0  # the test cluster's KillWait
    # Nobody drains the ranks here: the agent kills them just before Slurm would, and still ends cleanly.
    result = jobs[0].node_job.job.results()[0]
    assert result.signals[0] == "SIGTERM" and result.notified == 1
    info = wait_sacct(job_id, f"{job_id}.0", {"COMPLETED", "CANCELLED", "FAILED"})
    assert info[job_id][0] == "CANCELLED"
    assert info[f"{job_id}.0"] == ("COMPLETED", "0:0")  # the agent's step exited 0


@pytest.mark.slurm
@requires_slurm
def test_walltime_warning_is_forwarded_and_ranks_leave_on_shutdown(head, launcher):
    jobs = launcher.launch(head.launches([7]), pool="small")
    job_id = jobs[0].job_id
    head.wait_hellos([7], jobs[0])
    # what --signal=USR2@60 delivers 60 s before the time limit (sent now, rather than waiting for it)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    _, notice = head.leaving_notice(jobs[0])
    assert (notice.rank_ids, notice.seconds) == ([7], 60.0) and notice.reason.startswith("walltime warning")
    head.shutdown([7])  # the coordinator would drain the rank first
    result = jobs[0].node_job.job.results()[0]
    assert result.exit_codes == [0] and result.signals == ["SIGUSR2"]
    assert wait_sacct(job_id, job_id, {"COMPLETED"})[job_id] == ("COMPLETED", "0:0")


@pytest.mark.slurm
@requires_slurm
def test_preempted_spot_job_tells_the_head_and_exits_0(head, tmp_path):
    from eep_hpc.cluster.slurm import SlurmLauncher

    # a spot node job holding all of n4, then a job of a higher-tier partition that needs n4
    spot = name_pools({"spot": Pool(partition="low", cpus_per_node=8, time_limit_min=10, warning_s=30,
                                    sbatch={"nodelist": "n4"})})
    jobs = SlurmLauncher(tmp_path / "run", spot, device="cpu").launch(head.launches([9]))
    job_id = jobs[0].job_id
    head.wait_hellos([9], jobs[0])
    high = subprocess.run(["sbatch", "--parsable", "-p", "small", "-w", "n4", "-c", "8", "-o", "/dev/null",
                           "--wrap", "true"], capture_output=True, text=True, check=True).stdout.strip()
    _, notice = head.leaving_notice(jobs[0])
    assert (notice.job_id, notice.rank_ids) == (job_id, [9]) and notice.reason.startswith("SIGTERM")
    result = jobs[0].node_job.job.results()[0]
    assert result.signals[0] == "SIGTERM" and result.notified == 1
    wait_sacct(high, high, {"COMPLETED"})
    assert sacct(job_id)[f"{job_id}.0"] == ("COMPLETED", "0:0")


@pytest.mark.slurm
@requires_slurm
def test_pending_job_is_alive_until_cancelled(head, tmp_path):
    from eep_hpc.cluster.slurm import SlurmLauncher

    later = name_pools({"later": Pool(partition="small", time_limit_min=5, warning_s=30,
                                      sbatch={"begin": "now+3600"})})
    jobs = SlurmLauncher(tmp_path / "run", later, device="cpu").launch(head.launches([11, 12]))
    job_id = jobs[0].job_id
    wait_sacct(job_id, job_id, {"PENDING"})
    deadline = time.monotonic() + 30
    while not jobs[0].pending():  # UNKNOWN until the watcher's first sacct call sees the job
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert all(j.alive() and j.pending() for j in jobs)  # a grow waits for these ranks rather than failing them
    jobs[0].cancel()
    assert jobs[1].alive()  # the job is shared: cancelled only when all its ranks are given back
    jobs[1].cancel()
    wait_sacct(job_id, job_id, {"CANCELLED"})
    deadline = time.monotonic() + 30
    while jobs[0].alive():
        assert time.monotonic() < deadline
        time.sleep(1)


# ---- the real head, ranks in node jobs --------------------------------------------------------------------------


@pytest.mark.slurm
@requires_slurm
def test_head_serves_from_ranks_in_node_jobs_grows_and_drains_on_walltime_warning(tmp_path):
    from eep_hpc.head.main import Head
    from eep_hpc.cluster.slurm import SlurmLauncher

    raw = tomllib.loads(TEST_CONFIG.read_text())
    pools = parse_pools(raw.pop("pools"))
    raw["serve"] = {"port": 0}
    raw["control"]["run_dir"] = str(tmp_path / "run")
    raw["control"]["host"] = cluster_network().host_address  # the head runs here, its ranks on the nodes
    cfg = msgspec.convert(raw, Config)
    launcher = SlurmLauncher(cfg.control.run_dir, pools, default_pool="big", device="cpu")
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
        head = box["head"]

        def complete() -> dict:
            r = httpx.post(f"{head.url}/v1/completions", timeout=120, json={
                "model": head.coordinator.model_name, "prompt": "The capital of", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]

        first = complete()
        state = httpx.get(f"{head.url}/admin/state", timeout=10).json()
        slurm_ids = {j.job_id for j in launcher.jobs}
        assert len(launcher.jobs) == 1 and all(str(r["job_id"]) in slurm_ids for r in state["ranks"])
        # the first ranks run on the small pool's nodes (n3, n4), the grown one on a big node (n1 or n2)
        summary = asyncio.run_coroutine_threadsafe(head.coordinator.grow(1, "big"), box["loop"]).result(300)
        assert len(launcher.jobs) == 2 and len(head.coordinator.members) == 3, summary
        ranks = head.coordinator.ranks
        joiner = head.coordinator.members[-1]
        if cluster_network().nodes:  # each node its own host: rank processes say which one they run on
            assert {ranks[r].host for r in head.coordinator.members[:2]} <= {"n3", "n4"}
            assert ranks[joiner].host in {"n1", "n2"}
        if NIXL:  # the joiner read its dense weights from a serving rank on another node, over NIXL's UCX
            source = int(summary["dense_source"].removeprefix("nixl:"))
            assert ranks[source].host != ranks[joiner].host and summary["dense_bytes"] > 0, summary
        assert complete()["text"] == first["text"]  # same greedy text on 3 ranks in 2 node jobs
        # The grown node job's walltime warning: its agent tells the head, which drains the rank (shrink), the
        # rank exits, and the node job ends on its own, long before its time limit.
        grown = launcher.jobs[1].job_id
        subprocess.run(["scancel", "--signal=USR2", grown], check=True)
        info = wait_sacct(grown, grown, {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT"}, timeout_s=90)
        assert info[grown] == ("COMPLETED", "0:0"), info
        assert len(head.coordinator.members) == 2
        assert [e.kind for e in head.coordinator.history][-2:] == ["grow", "shrink"]
        assert complete()["text"] == first["text"]
        # A node job's rank lost without notice (SIGKILL, as at the end of a grace period or on a crashed node),
        # then the job itself: the survivors re-form without it, and serving goes on with the same text.
        asyncio.run_coroutine_threadsafe(head.coordinator.grow(1), box["loop"]).result(300)
        lost = launcher.jobs[2].job_id
        rank = next(r for r in head.coordinator.ranks.values() if str(r.job.job_id) == str(lost))
        os.kill(rank.pid, signal.SIGKILL)
        subprocess.run(["scancel", "--signal=KILL", "--full", lost], check=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(e.kind == "recover" and e.phase.name == "DONE"
                                                      for e in head.coordinator.history):
            time.sleep(0.2)
        recovered = [e for e in head.coordinator.history if e.kind == "recover"]
        assert recovered and recovered[-1].phase.name == "DONE", [e.summary() for e in head.coordinator.history]
        assert len(head.coordinator.members) == 2
        assert complete()["text"] == first["text"]
    finally:
        if "loop" in box and "head" in box:
            box["loop"].call_soon_threadsafe(box["head"].request_stop)
        thread.join(120)
    assert not thread.is_alive()
    for job in launcher.jobs[:2]:
        wait_sacct(job.job_id, job.job_id, {"COMPLETED"})  # ranks stopped by the head, agents exited 0
