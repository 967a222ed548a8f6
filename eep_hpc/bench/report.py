"""The result JSON (metrics plus where and how they were measured) and the table printed at the end."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

from eep_hpc.bench.scale_plan import event_line

MAX_ERRORS = 50  # failed_requests keeps the first this many error strings


def device_name() -> str:
    """The first GPU's name from nvidia-smi, else the CPU model from /proc/cpuinfo."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                 text=True, timeout=20, check=True).stdout
            names = [n.strip() for n in out.splitlines() if n.strip()]
            if names:
                return names[0]
        except (subprocess.SubprocessError, OSError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def default_path(run_dir: str | Path, model: str, now: float | None = None) -> Path:
    """<run dir>/bench/<timestamp>-<model>.json: a result stays with the run it measured, out of the repository
    (results kept there are copied to results/ on purpose, or written there with --result-file)."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
    return Path(run_dir) / "bench" / f"{stamp}-{re.sub(r'[^A-Za-z0-9._-]+', '_', model).strip('_') or 'model'}.json"


def write_result(result: dict, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return out


def table(result: dict) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value, fmt: str = "") -> None:
        lines.append("{:<40} {:<10{}}".format(label, value if value is not None else "None", fmt))

    row("Successful requests:", result["completed"])
    row("Failed requests:", result["failed"])
    if result.get("max_concurrency"):
        row("Maximum request concurrency:", result["max_concurrency"])
    row("Request rate (req/s):", result["request_rate"])
    row("Benchmark duration (s):", result["duration"], ".2f")
    row("Total input tokens:", result["total_input_tokens"])
    row("Total generated tokens:", result["total_output_tokens"])
    row("Request throughput (req/s):", result["request_throughput"], ".2f")
    row("Output token throughput (tok/s):", result["output_throughput"], ".2f")
    row("Total Token throughput (tok/s):", result["total_token_throughput"], ".2f")
    for key, title, name in (("ttft", "Time to First Token", "TTFT"),
                             ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                             ("itl", "Inter-token Latency", "ITL"), ("e2el", "End-to-end Latency", "E2EL")):
        lines.append("{s:{c}^{n}}".format(s=title, n=50, c="-"))
        row(f"Mean {name} (ms):", result[f"mean_{key}_ms"], ".2f")
        row(f"Median {name} (ms):", result[f"median_{key}_ms"], ".2f")
        row(f"P99 {name} (ms):", result[f"p99_{key}_ms"], ".2f")
    if result.get("scale_events"):
        lines.append("{s:{c}^{n}}".format(s="Scale Events", n=50, c="-"))
        lines += [f"t={e.get('t_s', 0):.1f}s {event_line(e)}" for e in result["scale_events"]]
    lines.append("=" * 50)
    return "\n".join(lines)
