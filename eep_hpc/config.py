"""Typed configuration, loaded from configs/*.toml.

Every section is a msgspec Struct with defaults that make up the embedded default (tiny model, CPU, one rank);
a TOML file only names what differs. Unknown keys are rejected with the valid ones listed, so a typo in a config
never silently does nothing.
"""

from __future__ import annotations

import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Literal

import msgspec

TINY_MODEL = "tiny"

# Value ranges a field must fall in, checked when a config is loaded (msgspec names the key and the bound).
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Seconds = Annotated[float, msgspec.Meta(gt=0)]  # a period or timeout that must pass
SecondsOrOff = Annotated[float, msgspec.Meta(ge=0)]  # 0 = off (or: at once)
Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]  # 0 = a free port


class ModelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # "tiny" (the built-in checkpoint, generated on first use) or a Hugging Face-format directory.
    path: str = TINY_MODEL
    # Name clients put in the "model" field; defaults to the directory's name.
    name: str = ""
    # "auto": weights from *.safetensors; "dummy": random weights of config.json's shape (benchmarks).
    load_format: Literal["auto", "dummy"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # 0 = the model's max_position_embeddings.
    max_model_len: NonNegative = 0
    seed: int = 0  # seed of dummy weights
    # "auto": as config.json's quantization_config says; "fp8": block-scaled e4m3 weights (128 x 128) even for an
    # unquantised checkpoint or dummy weights (quantised at load); "none": every weight in the serving dtype (an
    # FP8 checkpoint is dequantised at load). FP8 expert slots stay fp8 on CUDA with Triton; elsewhere (CPU,
    # EEP_HPC_KERNELS=reference) the loader dequantises them.
    quantization: Literal["auto", "fp8", "none"] = "auto"

    def served_name(self) -> str:
        if self.name:
            return self.name
        return "eep-tiny-moe" if self.path == TINY_MODEL else Path(self.path).resolve().name


class EngineConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    block_size: Positive = 16
    # Fixed KV block count; 0 = size from memory (kv_cache_gib on CPU, gpu_memory_utilization on GPU).
    num_kv_blocks: NonNegative = 0
    kv_cache_gib: Annotated[float, msgspec.Meta(gt=0)] = 0.25
    gpu_memory_utilization: Fraction = 0.85
    max_num_seqs: Positive = 64
    max_num_batched_tokens: Positive = 2048
    seed: int = 0  # seed for requests that bring none
    # Share the KV blocks of identical prompt prefixes between requests (full blocks, hashed with their parent).
    enable_prefix_caching: bool = True
    # On CUDA, replay steps as CUDA graphs (vLLM's default; False = vLLM's enforce_eager). Graphs are captured at
    # startup: decode steps for batch sizes 1, 2, 4, 8, 16, 32, ... up to cuda_graph_max_batch (0 = max_num_seqs),
    # other steps (prefill chunks with decodes) for 32, 64, 128, 256, 384, ... tokens up to cuda_graph_max_tokens
    # (0 = none; at most max_num_batched_tokens).
    cuda_graphs: bool = True
    cuda_graph_max_batch: NonNegative = 0
    cuda_graph_max_tokens: NonNegative = 1024
    # A directory: each rank writes a JSON line per step there (rank/step_trace.py); "" = off.
    step_trace: str = ""


class ParallelConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    ranks: Positive = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # All-to-all backend for MoE dispatch/combine: "torch" (all_to_all over gloo/NCCL in fixed-size buffers, CPU and
    # GPU) or "nixl_ep" (nixl_ep's low-latency kernels; CUDA, bfloat16, hidden sizes 2048-8192).
    backend: Literal["torch", "nixl_ep"] = "torch"
    # In a multi-rank epoch one MoE dispatch carries at most this many tokens per rank (nixl_ep: at least the
    # largest decode graph); a bigger step runs its MoE in an agreed number of such chunks.
    moe_chunk_tokens: Positive = 256
    # Ranks a nixl_ep buffer holds at once: peers join without rebuilding it up to this many; 0 = the largest of
    # ranks, adapt.max_ranks and 2. A bigger membership rebuilds every member's buffer.
    nixl_ep_max_ranks: NonNegative = 0
    # nixl_ep's dispatch layout covers every seat of the buffer (nixl_ep_max_ranks), members or not, so a grow or
    # shrink keeps the CUDA graphs; its receive tensors ([slots per rank, seats * tokens, hidden] per dispatch)
    # grow with the seats. false: the layout ends at the highest member's seat (smaller tensors; a grow or shrink
    # that moves that bound re-captures every graph).
    nixl_ep_fixed_layout: bool = True
    # Physical expert slots beyond one per logical expert, spread over the ranks (EPLB replicas).
    redundant_experts: NonNegative = 0
    # Rebalance experts every this many seconds of serving; 0 = only on demand.
    eplb_period_s: SecondsOrOff = 0.0
    # How weights move when ranks join or experts move: "nixl" = one-sided READs from serving peers (dense weights
    # and expert slots), falling back to "collective" = a broadcast of dense weights and an all-to-all of experts
    # over a transfer group; "checkpoint" = joiners read dense weights from disk (experts still move peer to peer).
    weight_transfer: Literal["nixl", "collective", "checkpoint"] = "nixl"
    # Serving ranks read the experts of their next epoch over NIXL while they keep serving, and joiners read their
    # dense weights from serving peers; this caps those read rates (GB/s per rank) so they leave the links to the
    # dispatch/combine traffic. 0 = no cap.
    transfer_gbps: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # Where ranks run: "local" processes (submitit's LocalExecutor), or "slurm" node jobs from [pools.*].
    launcher: Literal["local", "slurm"] = "local"
    pool: str = ""  # the pool `grow` uses when none is named
    # What a rank runs: "model" = the model (engine/rank_engine.py); "standin" = no model, tokens at a set rate
    # ([standin], engine/standin.py): the head's benchmark (`eep-hpc bench-head`) loads the head as N GPUs would.
    rank_engine: Literal["model", "standin"] = "model"

    def __post_init__(self) -> None:
        if self.backend == "nixl_ep" and self.device == "cpu":
            raise ValueError('backend = "nixl_ep" needs CUDA GPUs, but device = "cpu" (use backend = "torch" on CPU)')


class ServeConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Port = 8000
    # On Ctrl-C / SIGTERM new requests get a 503 at once; requests in flight have this long to finish, then each
    # open stream gets an error event and [DONE] (a non-streaming request a 503) and the head stops its ranks.
    shutdown_grace_s: SecondsOrOff = 5.0
    api_key: str = ""  # empty = no key needed for /v1/*
    admin_token: str = ""  # empty = admin routes open, unless api_key is set (then a random one in RUN_DIR/admin-token)
    # HTTP processes on the one port (SO_REUSEPORT): the head's own and N - 1 more that stream tokens straight from
    # the ranks, while the head's coordinator alone decides (head/api_link.py); one per spare CPU core is the idea.
    api_servers: Positive = 1
    # A folder each API process writes the send time of every streamed token to (api-<pid>.jsonl, one line per
    # finished stream: serve/write_log.py); "" = none. For the head benchmark, with standin.emit_log.
    write_log: str = ""


class ControlConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Address ranks use to reach the head; ports 0 = pick free ones.
    host: str = "127.0.0.1"
    zmq_port: Port = 0
    store_port: Port = 0
    beacon_port: Port = 0  # the head's pings to its ranks, from a thread of their own (head/beacon.py)
    # The head pings every rank this often and every rank sends the head a beacon this often, each from a thread of
    # its own, so a rank busy loading weights or in a long step, and a head whose event loop is far behind its
    # streams, are still heard from.
    heartbeat_s: Seconds = 1.0
    # A rank that hears nothing from the head for this long exits (the head is gone).
    head_timeout_s: Seconds = 15.0
    # The head declares a rank dead after this long without a message from it (beacons included: a live rank is
    # silent about one heartbeat at most), and a serving group's collective waits this long on a silent peer, so
    # a step must stay shorter than it. Behind a cut link: noticed within rank_timeout_s + heartbeat_s.
    rank_timeout_s: Seconds = 5.0
    # While the first epoch's ranks load the model, and while a prepared group's members meet after copying
    # experts, a rank waits this long for the slowest peer (then the group gets rank_timeout_s).
    load_timeout_s: Seconds = 120.0
    # The head waits this long for ranks' answers in a scaling event (joining ranks: 4x to start and to stage the
    # model; 2x to prepare, counted from the latest progress of the expert reads), and open requests for a recovery
    # 4x this long.
    event_timeout_s: Seconds = 30.0
    # A peer that does not show up for the expert transfer of a scaling event fails it (and it rolls back) after
    # this long; serving pauses at most this long in that case.
    transfer_timeout_s: Seconds = 20.0
    # A rank told to terminate (SIGTERM) asks to be drained within this many seconds (Slurm's KillWait/GraceTime).
    leave_notice_s: SecondsOrOff = 30.0
    run_dir: str = "runs/local"
    # The run's control secret (signing.py signs every head/rank/agent message with it): the head writes it to
    # this file (default <run_dir>/control-secret, mode 600) before it starts ranks, which read it from there.
    secret_file: str = ""


class StandinConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Stand-in ranks (parallel.rank_engine = "standin"): engine.max_num_seqs is the batch each steps."""

    # decode steps a rank makes per second while it has requests (one token each)
    steps_per_s: Annotated[float, msgspec.Meta(gt=0)] = 50.0
    # A folder each rank writes its emit times to (rank-<id>.jsonl: one line per finished request); "" = none.
    emit_log: str = ""
    # seconds a rank takes to enter its first epoch (a GPU rank loads, warms up and captures graphs meanwhile)
    startup_s: SecondsOrOff = 0.0


class AdaptConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Adaptive scaling (head/autoscaler.py); `eep-hpc adapt --min A --max B` turns it on at run time."""

    enabled: bool = False
    min_ranks: Positive = 1
    max_ranks: Positive = 1
    interval_s: Seconds = 2.0
    # grow when, for `sustain_s`, requests wait per rank above `queue_high` or the fullest KV cache is above `kv_high`
    queue_high: Annotated[float, msgspec.Meta(ge=0)] = 2.0
    kv_high: Fraction = 0.9
    sustain_s: SecondsOrOff = 10.0
    # shrink a rank once the whole group has been idle this long
    idle_s: SecondsOrOff = 60.0
    # replace ranks older than lifetime_s - replace_before_s (0 = ranks live forever), e.g. the node's walltime
    lifetime_s: SecondsOrOff = 0.0
    replace_before_s: SecondsOrOff = 300.0


# ---- node pools ([pools.NAME] tables; cluster/pools.py reads them from files) ------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class Pool(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One kind of Slurm node job the head may submit: a partition and one node's shape (cluster/pools.py)."""

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


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    parallel: ParallelConfig = msgspec.field(default_factory=ParallelConfig)
    serve: ServeConfig = msgspec.field(default_factory=ServeConfig)
    control: ControlConfig = msgspec.field(default_factory=ControlConfig)
    adapt: AdaptConfig = msgspec.field(default_factory=AdaptConfig)
    standin: StandinConfig = msgspec.field(default_factory=StandinConfig)
    # Node shapes for Slurm growth, [pools.NAME] tables (Pool above).
    pools: dict[str, Pool] = msgspec.field(default_factory=dict)

    def __post_init__(self) -> None:
        name_pools(self.pools)


class ConfigError(ValueError):
    pass


def load_config(path: str | Path | None = None, **overrides: dict) -> Config:
    """Read a TOML config (None = embedded default) and apply per-section overrides, e.g. serve={"port": 0}."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config path {p} is a directory, not a TOML file")
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            with p.open("rb") as f:
                raw = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror or e}") from None
    for section, values in overrides.items():
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{path or 'config'}: {section} must be a [{section}] table")
        raw.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    try:
        return msgspec.convert(raw, Config)
    except msgspec.ValidationError as e:
        raise ConfigError(f"{path or 'config'}: {_describe(str(e), raw)}") from None


def _describe(message: str, raw: dict) -> str:
    """msgspec's message about `raw` in the config's own terms: the key as `section.key`, what it must be, the
    value given; an unknown key with the valid keys of its table. Other messages pass through as they are."""
    found = re.fullmatch(r"(.*?)(?: - at `\$((?:\.\w+|\[\.\.\.\])*)`)?", message)
    what, where = found.group(1), found.group(2) or ""
    if where.startswith(".pools[...]"):  # msgspec does not say which pool: the first that fails on its own
        name = next((n for n, t in (raw.get("pools") or {}).items() if _fails_as_pool(t)), "NAME")
        where = f".pools.{name}" + where[len(".pools[...]"):]
    key = where.lstrip(".")
    value: object = raw
    for part in key.split(".") if key else []:
        value = value.get(part) if isinstance(value, dict) else None
    if unknown := re.fullmatch(r"Object contains unknown field `([^`]*)`", what):
        table = f"[{key}]" if key else "the top level (whose keys are tables)"
        return f"unknown key `{unknown.group(1)}` in {table}; valid keys: {', '.join(_table(key).__struct_fields__)}"
    if bound := re.fullmatch(r"Expected `\w+` ([<>]=?) (\S+)", what):
        return f"{key} must be {bound.group(1)} {float(bound.group(2)):g}, got {value!r}"
    if kind := re.fullmatch(r"Expected `(\w+)`, got `\w+`", what):
        return f"{key} must be {_KINDS.get(kind.group(1), kind.group(1))}, got {value!r}"
    if re.fullmatch(r"Invalid enum value .*", what):
        allowed = ", ".join(repr(v) for v in _choices(key))
        return f"{key} must be one of {allowed}, got {value!r}" if allowed else f"{key}: {what}"
    return f"{key}: {what}" if key else what


_KINDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "object": "a table", "array": "an array"}


def _fails_as_pool(table: object) -> bool:
    try:
        msgspec.convert(table, Pool)
    except (msgspec.ValidationError, ValueError):
        return True
    return False


def _table(key: str) -> type[msgspec.Struct]:
    """The Struct of the table at `key` ("" = the whole config, "engine", "pools.big")."""
    if not key:
        return Config
    if key.startswith("pools."):
        return Pool
    return type(getattr(Config(), key.split(".")[0]))


def _choices(key: str) -> tuple:
    """The values a Literal-typed key allows (e.g. model.dtype), () when it is not one."""
    table, _, name = key.rpartition(".")
    hint = typing.get_type_hints(_table(table)).get(name)
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def to_dict(cfg: Config) -> dict:
    return msgspec.to_builtins(cfg)
