"""Every message between the head, node agents and ranks, declared once and used by both ends.

Wire format: one ZMQ frame per message, msgpack (msgspec, tagged by class name) behind an HMAC-SHA256 signature
with the run's secret and a per-sender counter (signing.py: encode, decode_for_rank, decode_for_head); no pickle on
the wire. The head binds a ROUTER socket; each rank connects a DEALER whose identity is
`signing.rank_identity(rank_id)`, and one more with the same identity to the head's beacon (its Pings).

Ids: `rank_id` is a stable integer the head assigns when it launches a rank; an *epoch* orders the member ranks
(`Epoch.rank_ids`), and a rank's index in that list is its rank within that epoch's groups.
"""

from __future__ import annotations

from typing import Literal, Union

import msgspec

from eep_hpc.config import Config

PROTOCOL_VERSION = 3  # 2: messages are msgspec arrays (array_like), RankStats counts host collectives; 3: PrepareProgress

FinishReason = Literal["stop", "length", "abort", "error"]


class _Msg(msgspec.Struct, tag=True, kw_only=True, omit_defaults=True, array_like=True):
    pass


class SamplingParams(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What the rank needs to pick tokens; stop strings and detokenization stay in the head."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    seed: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] = []
    # vLLM's penalties (engine/penalties.py): presence and frequency over the output tokens so far (0 = off),
    # repetition over prompt and output tokens (> 0; 1 = off).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    # Logprobs of the model's raw distribution (log_softmax of the logits, before min_tokens masking, penalties,
    # temperature, top-k and top-p; vLLM's default "raw_logprobs"). None = not computed (no cost); k = the chosen
    # token's logprob plus the k most likely tokens. `logprobs` is for sampled tokens, `prompt_logprobs` for the
    # prompt's.
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class RankLaunch(msgspec.Struct, kw_only=True):
    """Everything a rank process needs to start; handed over by the launcher (local or a Slurm node agent)."""

    rank_id: int
    head_address: str  # tcp://host:port of the head's ROUTER socket
    head_beacon_address: str = ""  # the head's beacon (head/beacon.py): its Pings come from there
    model_dir: str
    eos_token_ids: list[int]
    device: str  # "cpu" or "cuda:N"
    config: Config
    # Sockets of the head's other API processes (serve.api_servers > 1): AddRequest.reply_to = i sends a request's
    # outputs to api_addresses[i - 1] instead of head_address.
    api_addresses: list[str] = []


class ApiLaunch(msgspec.Struct, kw_only=True):
    """Everything one of the head's other API processes needs (serve.api_servers > 1); on its stdin, since the
    serve config may carry the API key and admin token."""

    api: int  # 1 .. api_servers - 1
    config: Config  # the head's, with serve.api_key / serve.admin_token in force
    port: int  # the head's HTTP port, shared (SO_REUSEPORT)
    head_address: str  # the head's API link (head/api_link.py)
    admin_url: str  # the head's private HTTP listener: /admin/* and /metrics are passed on to it
    model_name: str
    max_model_len: int
    vocab_size: int | None
    tokenizer_dir: str
    metrics_dir: str  # prometheus_client's multiprocess files, shared by every API process


# ---- head -> rank -------------------------------------------------------------------------------------------


class AddRequest(_Msg, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # Tokens already produced elsewhere (a request moved from another rank): re-prefilled, not re-sampled.
    output_token_ids: list[int] = []
    # The API process that streams this request (0: the head itself); its outputs go straight to that process.
    reply_to: int = 0


class AbortRequests(_Msg):
    request_ids: list[str]


class Wake(_Msg):
    """Work arrived somewhere in the epoch: every member must step so the MoE collectives can run.

    Waves are numbered: all members leave wave w together (a collective says nobody has work), then count w + 1.
    A Wake for an older wave is stale and ignored; the head starts the next wave when it still has requests out.
    """

    wave: int


class Ping(_Msg):
    """Every heartbeat, from the head's beacon thread (head/beacon.py) on its own socket; answered with a Pong."""

    sent_at: float


class Epoch(_Msg):
    """Membership and expert placement of one epoch; groups are built under its store prefix (epoch_store_prefix)."""

    epoch: int
    rank_ids: list[int]
    store_host: str
    store_port: int
    # physical_to_logical[layer][slot] = logical expert held in that physical slot.
    physical_to_logical: list[list[int]]
    # Slots of epoch rank i are [slot_offsets[i], slot_offsets[i + 1]).
    slot_offsets: list[int]


class PrepareEpoch(_Msg):
    """Get ready for epoch `target` while the current one keeps serving (grow, shrink, rebalance).

    Participants are old and new members together, ordered: that order is their rank in the transfer group
    ("xfer/" in the epoch's prefix, collective only). Joining ranks get it twice: the first makes them build their
    skeleton and say RankStaged; the second (sent to every participant) says how experts are copied. Current
    members act only once all of them have it (agreed by a collective at a step boundary); then every participant
    copies experts per `moves` into staging and the new members build the epoch's groups; over NIXL, serving
    members start their reads at once and keep serving, and only the group is built at the agreed boundary.
    Each answers EpochPrepared or PrepareFailed.
    """

    target: Epoch
    participants: list[int]
    # One row per expert copy: [moe_layer, logical_expert, src_rank_id, dst_rank_id, dst_global_slot,
    # src_local_slot (where the source holds it in the current epoch)].
    moves: list[list[int]]
    # The epoch serving now, whose published expert slots (NIXL) the copies read from.
    source_epoch: int = 0
    # "nixl": readers fetch remote copies from the sources' published slots; "collective": an all-to-all over a
    # transfer group of all participants (when some participant has no NIXL).
    transfer: Literal["nixl", "collective"] = "collective"
    # Some joiner has no dense weights yet (NIXL unavailable): participant 0 broadcasts them over the transfer group.
    broadcast_dense: bool = False
    # KV blocks a joining rank allocates (the smallest figure of the current ranks); 0 = size its own.
    num_kv_blocks: int = 0
    # Members were lost abruptly: the current epoch's group is unusable. Survivors act on this at once (no step
    # boundary agreement), drop their group and every request (the head re-sends them after the commit), and
    # copies with src_rank_id -1 come from the checkpoint (experts only the lost ranks held).
    recovery: bool = False


class CommitEpoch(_Msg):
    """Switch to the prepared epoch at the next common step boundary; members then step in wave `wave`."""

    epoch: int
    wave: int


class AbortEpoch(_Msg):
    """Drop whatever was prepared for `epoch` and stay on the current one."""

    epoch: int


class Shutdown(_Msg):
    pass


# ---- rank -> head -------------------------------------------------------------------------------------------


class RankHello(_Msg):
    protocol_version: int
    rank_id: int
    pid: int
    host: str
    device: str


class RankReady(_Msg):
    rank_id: int
    num_kv_blocks: int
    block_size: int
    max_model_len: int
    nixl: bool = False  # it serves its weights over NIXL


class Logprobs(msgspec.Struct, kw_only=True, array_like=True, gc=False):
    """Logprobs of consecutive tokens, columnar: token_logprobs[i] is token i's logprob; top_ids[i] and
    top_logprobs[i] are the k most likely tokens at that position, most likely first."""

    token_logprobs: list[float] = []
    top_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []

    def __len__(self) -> int:
        return len(self.token_logprobs)


class RequestOutput(msgspec.Struct, kw_only=True, omit_defaults=True, array_like=True, gc=False):
    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    error: str = ""
    # One entry per new token (SamplingParams.logprobs set).
    logprobs: Logprobs | None = None
    # Prompt tokens 1 .. P-1 (token 0 has no logprob), with the first output (SamplingParams.prompt_logprobs set).
    prompt_logprobs: Logprobs | None = None


class RankStats(msgspec.Struct, kw_only=True, omit_defaults=True):
    num_running: int = 0
    num_waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    steps: int = 0
    graph_steps: int = 0  # of those, decode steps replayed as CUDA graphs (idle replays in a wave included)
    host_collectives: int = 0  # control collectives run (the step agreement: one per step of a multi-rank epoch)
    # Prefix caching since start: tokens of admitted requests looked up, and those found in the cache.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Tokens routed to each logical expert since the last report, per MoE layer: [layer][expert].
    expert_load: list[list[int]] = []


class StepOutputs(_Msg, gc=False):
    rank_id: int
    outputs: list[RequestOutput]
    stats: RankStats


class Pong(_Msg):
    rank_id: int
    sent_at: float
    stats: RankStats


class RankAlive(_Msg):
    """A rank's beacon, sent every heartbeat from a thread of its own: the rank's process runs and its link to the
    head works, even while its main loop loads weights or waits in a collective."""

    rank_id: int


class WaveDone(_Msg):
    """Epoch rank 0 reports that every member ran out of work and left `wave`."""

    rank_id: int
    wave: int


class EpochJoined(_Msg):
    rank_id: int
    epoch: int


class RankStaged(_Msg):
    """A joining rank has its model skeleton, dense weights and KV cache, and waits for the expert transfer."""

    rank_id: int
    epoch: int
    dense_source: str  # "nixl:<peer rank id>", "broadcast" (to come, during prepare) or "checkpoint"
    dense_bytes: int
    dense_seconds: float
    nixl: bool = False  # it can read and serve weights over NIXL


class EpochPrepared(_Msg):
    rank_id: int
    epoch: int
    bytes_received: int
    seconds: float  # from the PrepareEpoch to prepared
    served_steps: int = 0  # steps this rank served meanwhile (its experts arrived in the background)
    pause_s: float = 0.0  # how long it stopped serving for the prepare (at the agreed step boundary)


class PrepareProgress(_Msg):
    """A participant's reads go on (a joiner's dense weights, then expert slots): sent about every heartbeat while
    pieces keep arriving. The head's waits for RankStaged and EpochPrepared run from the latest one, so a large
    move over a slow link is not taken for a hung one."""

    rank_id: int
    epoch: int
    bytes_received: int
    bytes_total: int


class PrepareFailed(_Msg):
    rank_id: int
    epoch: int
    error: str


class EpochLeft(_Msg):
    """A rank that is not a member of the committed epoch has left the groups and waits for Shutdown."""

    rank_id: int
    epoch: int


class NodeLeaving(_Msg):
    """A node agent got a scheduler notice (walltime warning, preemption SIGTERM, scancel): its ranks must be gone
    within `seconds`. The coordinator drains them with experts reshuffled first, then tells them to exit."""

    job_id: str
    rank_ids: list[int]
    seconds: float
    reason: str


class GroupLost(_Msg):
    """A collective of the current epoch failed (a peer died or timed out): this rank dropped its group and its
    requests and waits, still answering pings, for a recovery PrepareEpoch."""

    rank_id: int
    epoch: int
    error: str


class RankFailed(_Msg):
    """Sent by a rank that is about to exit because of an error it cannot recover from."""

    rank_id: int
    error: str


# ---- the head's API processes (serve.api_servers > 1) <-> the head ------------------------------------------
# An API process sends the head AddRequest (reply_to = its index; the head picks the rank and forwards it) and
# AbortRequests (its client left, a stop string matched); the ranks send it StepOutputs of its requests directly.


class ApiHello(_Msg):
    api: int  # 1 .. api_servers - 1 (0 is the head's own)
    rank_address: str  # where ranks send this process's outputs (RankLaunch.api_addresses)


class ApiResend(_Msg):
    """These requests lost their rank (it drains or was lost): submit each again with the tokens it has so far,
    under a new request id (outputs of the old one may still be on their way and are dropped)."""

    request_ids: list[str]


class ApiEnd(_Msg):
    """End these requests with `finish_reason` and `error` (no rank runs them any more); empty = all of them."""

    request_ids: list[str]
    finish_reason: FinishReason
    error: str = ""


class ApiReady(_Msg):
    """Whether requests can be served (the head's /health); sent on every change."""

    ready: bool


HeadToRank = Union[AddRequest, AbortRequests, Wake, Ping, Epoch, PrepareEpoch, CommitEpoch, AbortEpoch, Shutdown]
RankToHead = Union[
    RankHello, RankReady, StepOutputs, Pong, WaveDone, EpochJoined, RankStaged, EpochPrepared, PrepareProgress,
    PrepareFailed, EpochLeft, NodeLeaving, GroupLost, RankFailed, RankAlive,
]
ApiToHead = Union[ApiHello, AddRequest, AbortRequests]
HeadToApi = Union[ApiResend, ApiEnd, ApiReady]
