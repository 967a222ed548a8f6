"""Node pools: the kinds of Slurm node job the head may submit (a partition and one node's shape).

A config names its pools in `[pools.NAME]` tables; `eep-hpc grow N --pool NAME` turns N ranks into
ceil(N / ranks_per_node) nodes of that pool, submitted as one node job (several pools at once: one heterogeneous job).

    [pools.big]
    partition = "gpu"
    gpus_per_node = 4
    cpus_per_node = 32
    mem_gb = 200
    time_limit_min = 240
    warning_s = 120          # Slurm sends SIGUSR2 this long before the time limit (--signal=USR2@120)

Unknown keys are rejected with the valid ones listed, as everywhere in the config. `Pool` itself is part of the
configuration (config.py); this module reads pools from a table or a file.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import msgspec

from eep_hpc.config import Pool, PoolError, name_pools


def parse_pools(raw: dict) -> dict[str, Pool]:
    """The `pools` table of a config ({NAME: {key: value}}) as typed pools; unknown keys are rejected."""
    if not isinstance(raw, dict):
        raise PoolError("pools must be a table of [pools.NAME] tables")
    pools = {}
    for key, table in raw.items():
        try:
            pools[key] = msgspec.convert(table, Pool)
        except msgspec.ValidationError as e:
            why = str(e).removesuffix(" - at `$`")
            if "unknown field" in why:
                why += f"; valid keys: {', '.join(Pool.__struct_fields__)}"
            raise PoolError(f"[pools.{key}]: {why}") from None
    return name_pools(pools)


def load_pools(path: str | Path) -> dict[str, Pool]:
    """The pools of a TOML config file (its [pools.NAME] tables)."""
    with Path(path).open("rb") as f:
        return parse_pools(tomllib.load(f).get("pools", {}))
