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

Unknown keys are rejected with the valid ones listed, as everywhere in the config.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import msgspec

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Pool(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Filled in from the table's key ([pools.NAME]); when given it must match.
    name: str = ""
    partition: str = ""  # "" = the cluster's default partition
    # GPUs per node (--gpus-per-node); 0 = a CPU node.
    gpus_per_node: int = 0
    cpus_per_node: int = 0  # --cpus-per-task of the one node-agent task; 0 = Slurm's default
    mem_gb: float = 0  # --mem; 0 = Slurm's default
    time_limit_min: int = 60  # --time
    account: str = ""
    qos: str = ""
    constraint: str = ""
    # Walltime warning: Slurm sends SIGUSR2 this many seconds before the time limit (--signal=USR2@warning_s);
    # the node agent tells the head its ranks leave in that time. Slurm may send it up to a minute early (and
    # with a 1-minute limit, before the agent is up): keep time limits well above warning_s + 60.
    warning_s: int = 120
    # Ranks the node agent starts on each node; 0 = gpus_per_node (one rank per GPU), or 1 on a CPU node.
    ranks_per_node: int = 0
    # How many expert slots a rank of this pool holds relative to others (e.g. 2.0 for GPUs with twice the
    # memory): EPLB gives ranks of different node shapes slot capacities in this proportion.
    expert_capacity: float = 1.0
    # Shell lines run in the job script before the node agent starts (module load …, source venv/bin/activate).
    setup: list[str] = []
    # Further sbatch options, e.g. {reservation = "x", exclusive = true}; written as --KEY=VALUE.
    sbatch: dict[str, str | int | bool] = {}

    def __post_init__(self) -> None:
        if self.name and not _NAME.match(self.name):
            raise ValueError(f"pool name {self.name!r}: use letters, digits, '_', '.', '-'")
        for field in ("gpus_per_node", "cpus_per_node", "ranks_per_node", "warning_s"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0")
        if self.mem_gb < 0:
            raise ValueError("mem_gb must be >= 0")
        if self.time_limit_min < 1:
            raise ValueError("time_limit_min must be >= 1")
        if self.warning_s >= self.time_limit_min * 60:
            raise ValueError(f"warning_s ({self.warning_s}) must be shorter than the time limit "
                             f"({self.time_limit_min} min)")
        if self.ranks_per_node == 0:
            self.ranks_per_node = self.gpus_per_node or 1
        if self.gpus_per_node and self.ranks_per_node > self.gpus_per_node:
            raise ValueError(f"ranks_per_node ({self.ranks_per_node}) exceeds gpus_per_node ({self.gpus_per_node})")

    def nodes_for(self, num_ranks: int) -> int:
        """Nodes needed for num_ranks ranks of this pool."""
        return -(-num_ranks // self.ranks_per_node)


class PoolError(ValueError):
    pass


def name_pools(pools: dict[str, Pool]) -> dict[str, Pool]:
    """Give each pool its table key as name (what msgspec cannot do while converting a dict of pools)."""
    for key, pool in pools.items():
        if not _NAME.match(key):
            raise PoolError(f"pool name {key!r}: use letters, digits, '_', '.', '-'")
        if pool.name and pool.name != key:
            raise PoolError(f"[pools.{key}] has name = {pool.name!r}; leave it out or make it {key!r}")
        pool.name = key
    return pools


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
