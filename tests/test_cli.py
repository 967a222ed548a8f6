"""The `eep-hpc` command as a user meets it: mistakes end in one line naming the problem and a nonzero exit,
never a traceback, and before anything starts."""

from __future__ import annotations

import subprocess
import sys


def eep(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eep_hpc.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess, code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("eep-hpc: "), r.stderr
    return lines[0]


def test_grow_and_shrink_need_at_least_one_rank():
    # refused before any request: the URL leads nowhere
    assert "N >= 1" in one_line_error(eep("grow", "0", "--url", "http://127.0.0.1:9"))
    assert "N >= 1" in one_line_error(eep("shrink", "0", "--url", "http://127.0.0.1:9"))
    assert "COUNT" in one_line_error(eep("grow", "2", "--pool", "a:1", "--url", "http://127.0.0.1:9"))


def test_rebalance_that_moves_nothing_says_so(api):
    r = eep("rebalance", "--url", api.url)
    assert r.returncode == 0, r.stderr
    assert "placement unchanged, nothing moved" in r.stdout
