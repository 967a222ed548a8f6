"""The head's discovery file: where a login-node CLI finds the running head (API URL, coordinator address) and
the files holding its API key and admin token (when it has them).

Written to <run_dir>/head.json with mode 600, since it may point at secrets; the run dir itself is mode 700.
"""

from __future__ import annotations

import os
from pathlib import Path

import msgspec

from eep_hpc.signing import write_private

FILE_NAME = "head.json"


class HeadInfo(msgspec.Struct, kw_only=True):
    api_url: str
    coordinator: str
    pid: int
    host: str
    model: str
    admin_token_file: str = ""
    api_key_file: str = ""  # set when the head made its own key (a Slurm job without serve.api_key)


def read_token(path: str) -> str:
    """A token or key the discovery file points at; "" when none (or not readable here)."""
    try:
        return Path(path).read_text().strip() if path else ""
    except OSError:
        return ""


def write(run_dir: str | Path, info: HeadInfo) -> Path:
    path = Path(run_dir) / FILE_NAME
    tmp = write_private(path.with_suffix(".tmp"), msgspec.json.encode(info))
    os.replace(tmp, path)
    return path


def find_run_dir() -> Path:
    """The run dir a CLI on a login node means when it names none: $EEP_RUN_DIR, else the newest runs/*/ that
    holds a head.json (sbatch/head.sh uses runs/<job id>), else runs/local."""
    if os.environ.get("EEP_RUN_DIR"):
        return Path(os.environ["EEP_RUN_DIR"])
    found = sorted(Path("runs").glob(f"*/{FILE_NAME}"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else Path("runs/local")


def read(run_dir: str | Path | None) -> HeadInfo:
    path = Path(run_dir if run_dir is not None else find_run_dir()) / FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no running head found: {path} does not exist (is `eep-hpc serve` running with this run dir?)")
    return msgspec.json.decode(path.read_bytes(), type=HeadInfo)


def remove(run_dir: str | Path) -> None:
    (Path(run_dir) / FILE_NAME).unlink(missing_ok=True)
