"""The in-process micro-benchmark of serve/ (eep_hpc/bench/serve_path.py) drives the real app over ASGI: every
stream gets a 200 and its [DONE], and the figures it reports are there; with --server uvicorn through uvicorn's
request cycle, where the direct lane writes the chunks."""

import asyncio

import pytest

from eep_hpc.bench import serve_path


@pytest.mark.parametrize("server", ["asgi", "uvicorn"])
def test_serve_path_streams_every_request_to_its_end(server):
    r = asyncio.run(serve_path.run(streams=16, tokens=12, steps_per_s=40, freeze=False, server=server))
    assert r["statuses"] == [200] and r["ended"] == 16
    # 16 streams x the 8 steps after the 4 warm-up ones: every token timed, in one chunk each or fewer (a late
    # writer's tokens merged)
    assert r["tokens"] == 16 * 8 and 0 < r["chunks"] <= 16 * 8 and r["cpu_us_per_token"] > 0
    assert 0 <= r["step_to_send_ms"]["p50"] <= r["step_to_send_ms"]["p99"] <= r["step_to_send_ms"]["max"]
    assert r["burst_ms"]["last_step"] > 0
    assert r["start_cpu_us_per_request"] > 0 and r["end_cpu_us_per_request"] > 0
