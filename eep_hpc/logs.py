"""Logging of every eep-hpc process: one level, from `--log-level` of the CLI, which the processes it starts (ranks,
node agents, their Slurm jobs) inherit through EEP_HPC_LOG_LEVEL. Below DEBUG nothing logs a line per HTTP call or
per request: httpx's "HTTP Request" lines and matplotlib's font cache notes only from WARNING (all at debug)."""

from __future__ import annotations

import logging
import os

LEVELS = ("debug", "info", "warning", "error")
LEVEL_ENV = "EEP_HPC_LOG_LEVEL"
CHATTY = ("httpx", "httpcore", "matplotlib")


def setup_logging(fmt: str, level: str | None = None) -> str:
    """Configure the root logger at `level`, else $EEP_HPC_LOG_LEVEL, else info; returns the level used and passes it
    on to child processes."""
    name = (level or os.environ.get(LEVEL_ENV) or "info").lower()
    if name not in LEVELS:  # a stray value in the environment must not stop a rank
        name = "info"
    os.environ[LEVEL_ENV] = name
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt))
    handler.setLevel(name.upper())  # also for loggers that set their own level (submitit's is INFO)
    logging.basicConfig(level=name.upper(), handlers=[handler])
    if name != "debug":
        for chatty in CHATTY:
            logging.getLogger(chatty).setLevel(logging.WARNING)
    return name
