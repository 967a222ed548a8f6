"""The whole Slurm workflow on the real test cluster (.ci/slurm-up), as a cluster user runs it: `sbatch
sbatch/head.sh`, then `eep-hpc status|grow|shrink` from the login side with no arguments but the run dir, under
streaming load: single and heterogeneous growth, shrink by CLI, release by scancel and by a walltime warning, a
pending job cancelled, and every job ending in the state expected, with zero failed requests."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import reference_texts, run_load
from support import ROOT, TEST_CONFIG, cluster_report, sacct, wait_sacct, why_no_slurm

NO_SLURM = why_no_slurm()
pytestmark = [pytest.mark.slurm, pytest.mark.skipif(bool(NO_SLURM), reason=NO_SLURM)]
EEP = [sys.executable, "-m", "eep_hpc.cli"]


def cli(*args: str, run_dir: Path, timeout: float = 300) -> str:
    r = subprocess.run([*EEP, *args, "--run-dir", str(run_dir)], capture_output=True, text=True, timeout=timeout,
                       cwd=ROOT)
    assert r.returncode == 0, f"eep-hpc {' '.join(args)}: {r.stdout}{r.stderr}\n{cluster_report()}"
    return r.stdout


def state(run_dir: Path) -> dict:
    return json.loads(cli("status", "--json", run_dir=run_dir))


def jobs_of(st: dict) -> dict[int, str]:
    return {r["rank_id"]: r["job_id"] for r in st["ranks"]}


def test_sbatch_head_grow_shrink_release_under_load(tmp_path):
    config = tmp_path / "cluster.toml"
    # the test cluster's config plus a pool whose jobs stay queued for an hour
    config.write_text(TEST_CONFIG.read_text().replace('run_dir = "runs/slurm-test"', f'run_dir = "{tmp_path}/run"')
                      + '\n[pools.later]\npartition = "small"\ncpus_per_node = 1\nmem_gb = 1\ntime_limit_min = 30\n'
                        'warning_s = 60\nsbatch = {begin = "now+3600"}\n')
    run_dir = tmp_path / "run"
    env = dict(os.environ, EEP_HPC=f"{sys.executable} -m eep_hpc.cli", PYTHONPATH=str(ROOT), EEP_PORT="0")
    out = subprocess.run(["sbatch", "--parsable", "--partition=debug", f"--output={tmp_path}/head-%j.out",
                          "sbatch/head.sh", str(config), str(run_dir)], capture_output=True, text=True, cwd=ROOT,
                         env=env, check=True).stdout
    head_job = out.strip().split(";")[0]
    try:
        deadline = time.monotonic() + 240
        while not (run_dir / "head.json").exists():
            ended = sacct(head_job).get(head_job, ("PENDING",))[0] not in ("PENDING", "RUNNING")
            assert time.monotonic() < deadline and not ended, Path(tmp_path / f"head-{head_job}.out").read_text()
            time.sleep(0.5)
        info = json.loads((run_dir / "head.json").read_text())
        url, model = info["api_url"], info["model"]
        # other users can reach the head's port: its admin routes want the run's token, which only the owner reads
        token_file = Path(info["admin_token_file"])
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        refused = httpx.post(f"{url}/admin/scale/grow", json={"n": 1})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        # and /v1/* its API key, which the owner's clients read from the file the discovery file names
        key_file = Path(info["api_key_file"])
        assert oct(key_file.stat().st_mode & 0o777) == "0o600" and oct(run_dir.stat().st_mode & 0o777) == "0o700"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        auth = {"Authorization": f"Bearer {key_file.read_text().strip()}"}
        st = state(run_dir)
        assert len(st["members"]) == 2  # configs/slurm-test.toml: 2 ranks, in node jobs of the default pool
        reference = asyncio.run(reference_texts(url, model, 24, headers=auth))

        async def scenario():
            stop = asyncio.Event()
            load = asyncio.create_task(run_load(url, model, 24, stop, streams=16, headers=auth))
            steps = []

            async def run(*args):
                steps.append(await asyncio.to_thread(cli, *args, run_dir=run_dir))

            await run("grow", "1", "--pool", "small")  # one node job
            await run("grow", "--pool", "big:1", "--pool", "small:1")  # one heterogeneous job, one event
            st = await asyncio.to_thread(state, run_dir)
            assert len(st["members"]) == 5
            await run("shrink", "1")  # the newest rank leaves by CLI
            victim = st["members"][2]  # the single-node job of the first grow
            victim_job = jobs_of(st)[victim]
            subprocess.run(["scancel", victim_job], check=True)  # Slurm takes the node back
            deadline = time.monotonic() + 120
            while victim in (await asyncio.to_thread(state, run_dir))["members"]:
                assert time.monotonic() < deadline, "the scancelled node was not drained"
                await asyncio.sleep(0.5)
            het_rank = st["members"][3]  # the big component of the heterogeneous job, still serving
            het_job = jobs_of(st)[het_rank]
            subprocess.run(["scancel", "--signal=USR2", het_job], check=True)  # its walltime warning
            deadline = time.monotonic() + 120
            while het_rank in (await asyncio.to_thread(state, run_dir))["members"]:
                assert time.monotonic() < deadline, "the node warned of its walltime was not drained"
                await asyncio.sleep(0.5)
            await run("grow", "1", "--pool", "later", "--no-wait")  # stays queued
            deadline = time.monotonic() + 60
            while not (pending := [r for r in (await asyncio.to_thread(state, run_dir))["ranks"]
                                   if r["state"] == "PENDING"]):
                assert time.monotonic() < deadline, "the queued job never showed as PENDING"
                await asyncio.sleep(0.5)
            assert len(pending) == 1
            await run("shrink", "--rank", str(pending[0]["rank_id"]))  # cancels the queued job
            stop.set()
            return await load, steps, pending[0]["job_id"], victim_job

        result, steps, pending_job, victim_job = asyncio.run(scenario())
        assert result.failures == []
        assert result.completed > 0
        for k, texts in result.texts.items():
            assert all(t == reference[k] for t in texts)
        final = state(run_dir)
        assert len(final["members"]) == 2
        kinds = [(e["kind"], e["from_ranks"], e["to_ranks"], e["phase"]) for e in final["scale_events"]]
        assert kinds[:3] == [("grow", 2, 3, "DONE"), ("grow", 3, 5, "DONE"), ("shrink", 5, 4, "DONE")]
        assert ("shrink", 4, 3, "DONE") in kinds and ("shrink", 3, 2, "DONE") in kinds  # scancel, walltime
        wait_sacct(pending_job, pending_job, {"CANCELLED"})
        # the scancelled node's agent handed off and exited 0 inside the notice
        assert wait_sacct(victim_job, f"{victim_job}.0", {"COMPLETED", "CANCELLED"})[f"{victim_job}.0"][1] == "0:0"
    finally:
        subprocess.run(["scancel", "--full", "--signal=TERM", head_job])  # the head shuts down in order
    info = wait_sacct(head_job, f"{head_job}.batch", {"COMPLETED", "CANCELLED", "FAILED"}, timeout_s=120)
    assert info[f"{head_job}.batch"][1] == "0:0", (info, Path(tmp_path / f"head-{head_job}.out").read_text()[-3000:])
