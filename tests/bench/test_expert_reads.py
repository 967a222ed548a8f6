"""Expert reads over real NIXL between two processes on the CPU (the benchmark scale events' reads are timed by):
every variant delivers the source's bytes, and the rate cap holds the reads back."""

from __future__ import annotations

import json

from eep_hpc.bench import expert_reads
from eep_hpc.parallel.weight_transfer import READ_PIECE_S


def test_expert_reads_deliver_the_source_bytes_and_the_cap_paces_them(tmp_path):
    out = tmp_path / "reads.json"
    gbps = 0.0002  # 200 kB/s: 8 experts of 12 KiB (bf16, 64 x 32) take about half a second
    expert_reads.main(["--device", "cpu", "--layers", "2", "--slots", "4", "--hidden", "64", "--intermediate", "32",
                       "--reads", "8", "--repeats", "1", "--gbps", str(gbps), "--out", str(out)])
    report = json.loads(out.read_text())
    rows = {r["variant"]: r for r in report["results"]}
    assert set(rows) == {"batched", "per_expert", "capped"}
    assert all(r["bytes_match"] for r in rows.values()), rows
    capped = rows["capped"]
    # pieces of READ_PIECE_S at the cap, the next posted only when the cap allows: all but the first piece wait
    piece = gbps * 1e9 * READ_PIECE_S
    assert capped["seconds"] >= (capped["bytes"] - 2 * piece) / (gbps * 1e9), capped

