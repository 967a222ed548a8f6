"""Every message between the head, node agents and ranks, declared once and used by both ends.

Wire format: one ZMQ frame per message, msgpack (msgspec, tagged by class name) behind an HMAC-SHA256 signature
with the run's secret and a per-sender counter (see "signed frames" at the end); no pickle on the wire.
The head binds a ROUTER socket; each rank connects a DEALER whose identity is `rank_identity(rank_id)`.

Ids: `rank_id` is a stable integer the head assigns when it launches a rank; an *epoch* orders the member ranks
(`Epoch.rank_ids`), and a rank's index in that list is its rank within that epoch's groups.
"""

from __future__ import annotations

import hmac
import itertools
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Literal, Union

import msgspec

from eep_hpc.config import Config

PROTOCOL_VERSION = 1

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
    # Logprobs of the model's raw distribution (log_softmax of the logits, before min_tokens masking, temperature,
    # top-k and top-p; vLLM's default "raw_logprobs"). None = not computed (no cost); k = the chosen token's
    # logprob plus the k most likely tokens. `logprobs` is for sampled tokens, `prompt_logprobs` for the prompt's.
    logprobs: int | None = None
    prompt_logprobs: int | None = None


class RankLaunch(msgspec.Struct, kw_only=True):
    """Everything a rank process needs to start; handed over by the launcher (local or a Slurm node agent)."""

    rank_id: int
    head_address: str  # tcp://host:port of the head's ROUTER socket
    model_dir: str
    eos_token_ids: list[int]
    device: str  # "cpu" or "cuda:N"
    config: Config


# ---- head -> rank -------------------------------------------------------------------------------------------


class AddRequest(_Msg, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    # Tokens already produced elsewhere (a request moved from another rank): re-prefilled, not re-sampled.
    output_token_ids: list[int] = []


class AbortRequests(_Msg):
    request_ids: list[str]


class Wake(_Msg):
    """Work arrived somewhere in the epoch: every member must step so the MoE collectives can run.

    Waves are numbered: all members leave wave w together (a collective says nobody has work), then count w + 1.
    A Wake for an older wave is stale and ignored; the head starts the next wave when it still has requests out.
    """

    wave: int


class Ping(_Msg):
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
    copies experts per `moves` into staging and the new members build the epoch's groups. Each answers
    EpochPrepared or PrepareFailed.
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
    seconds: float


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


HeadToRank = Union[AddRequest, AbortRequests, Wake, Ping, Epoch, PrepareEpoch, CommitEpoch, AbortEpoch, Shutdown]
RankToHead = Union[
    RankHello, RankReady, StepOutputs, Pong, WaveDone, EpochJoined, RankStaged, EpochPrepared, PrepareFailed, EpochLeft,
    NodeLeaving, GroupLost, RankFailed,
]

_encoder = msgspec.msgpack.Encoder()
_to_rank = msgspec.msgpack.Decoder(HeadToRank)
_to_head = msgspec.msgpack.Decoder(RankToHead)


# ---- signed frames ------------------------------------------------------------------------------------------
#
# Anyone on the cluster can connect to the head's ROUTER socket, so every frame is signed with the run's secret
# (32 random bytes the head writes to <run_dir>/control-secret, mode 600; ranks and node agents read that file,
# never argv or the environment). A frame is
#
#     tag (32 bytes) | sender (8 bytes) | counter (8 bytes, big-endian) | msgpack payload
#
# with tag = HMAC-SHA256(secret, sender | counter | payload). `sender` is random per process and `counter` counts
# the frames it encoded, so a receiver takes each (sender, counter) once: a frame recorded on the wire and sent
# again is dropped. Counters may arrive out of order by up to REPLAY_WINDOW frames (one process may encode on
# several threads); older ones are dropped too. No clocks are compared, so node clocks need not agree.
# Routing identities are derived from the secret as well (`identity_suffix`), so a process without it cannot take
# a rank's identity on the ROUTER socket before the rank connects.

SECRET_BYTES = 32
SECRET_FILE = "control-secret"
REPLAY_WINDOW = 1024
_TAG, _HEADER = 32, 48  # tag bytes; tag + sender + counter


class BadMessage(ValueError):
    """A frame the receiver drops (and logs): not signed with this run's secret, replayed, or malformed."""


class BadSignature(BadMessage):
    pass


class ReplayedMessage(BadMessage):
    pass


_secret: bytes | None = None
_sender = os.urandom(8)
_counter = itertools.count(1)
_seen: dict[bytes, tuple[int, int]] = {}  # sender -> (highest counter, bitmap of the REPLAY_WINDOW below it)
_lock = threading.Lock()


def _new_sender() -> None:  # a forked child is another sender (its counter would repeat the parent's)
    global _sender, _counter
    _sender, _counter = os.urandom(8), itertools.count(1)


os.register_at_fork(after_in_child=_new_sender)


def use_secret(secret: bytes) -> None:
    """Install the run's secret in this process: every frame it encodes is signed with it, every frame it decodes
    must be. Ranks and node agents call it once at start, with `read_secret(config.control.secret_file)`."""
    global _secret
    if len(secret) < 16:
        raise ValueError(f"a control secret needs at least 16 bytes, got {len(secret)}")
    _secret = bytes(secret)


def ensure_secret() -> bytes:
    """The secret installed in this process, or a new random one installed now (the head's). Heads that share a
    process (tests) share it, so their ranks all verify what this process signs."""
    if _secret is None:
        use_secret(secrets.token_bytes(SECRET_BYTES))
    return _secret


def _mac(data: bytes) -> bytes:
    if _secret is None:
        raise RuntimeError("no control secret installed in this process (protocol.use_secret): the head and its "
                           "ranks sign every message with the run's secret")
    return hmac.digest(_secret, data, "sha256")


def write_secret(path: str | Path, secret: bytes) -> Path:
    """Write a secret (hex) to a file only this user can read (mode 600, also when the file existed)."""
    from eep_hpc.cluster.discovery import write_private

    return write_private(path, secret.hex() + "\n")


def read_secret(path: str | Path) -> bytes:
    """The run's secret from its file; refused when others may read the file (like ssh with a private key)."""
    if not path:
        raise RuntimeError("no control secret file given (config.control.secret_file is set by the head)")
    path = Path(path)
    mode = path.stat().st_mode
    if mode & 0o077:
        raise PermissionError(f"{path} has mode {mode & 0o777:o}: the control secret must be readable by its owner "
                              f"only (chmod 600)")
    return bytes.fromhex(path.read_text().strip())


def identity_suffix() -> str:
    """A routing-identity suffix that only holders of the secret can compute."""
    return _mac(b"eep-hpc routing identity")[:8].hex()


def epoch_store_prefix(epoch: int) -> str:
    """TCPStore prefix of an epoch's groups. The store has no access control; with the secret in the prefix nobody
    can plant keys for a future epoch before its ranks write the first one (plain f"{epoch}/" in a process with no
    secret, e.g. a unit test of groups)."""
    if _secret is None:
        return f"{epoch}/"
    return f"{epoch}-{_mac(b'eep-hpc store epoch %d' % epoch)[:8].hex()}/"


def seal(name: str, data: bytes) -> bytes:
    """Sign a value another process of the run reads back by `name` (e.g. from the TCPStore): tag | data."""
    return _mac(name.encode() + b"\0" + data) + data


def unseal(name: str, sealed: bytes) -> bytes:
    tag, data = sealed[:_TAG], sealed[_TAG:]
    if not hmac.compare_digest(tag, _mac(name.encode() + b"\0" + data)):
        raise BadSignature(f"{name!r} is not signed with this run's secret")
    return data


def encode(msg: _Msg) -> bytes:
    body = _sender + next(_counter).to_bytes(8, "big") + _encoder.encode(msg)
    return _mac(body) + body


def _verified_payload(data: bytes) -> bytes:
    if len(data) <= _HEADER:
        raise BadSignature(f"a frame of {len(data)} bytes cannot be signed")
    tag, body = data[:_TAG], data[_TAG:]
    if not hmac.compare_digest(tag, _mac(body)):
        raise BadSignature("signature does not verify (not sent by a process holding this run's secret)")
    sender, counter = body[:8], int.from_bytes(body[8:16], "big")
    with _lock:
        top, seen = _seen.get(sender, (0, 0))
        if counter > top:
            seen = ((seen << (counter - top)) | 1) & ((1 << REPLAY_WINDOW) - 1)
            top = counter
        elif top - counter >= REPLAY_WINDOW or seen >> (top - counter) & 1:
            raise ReplayedMessage(f"frame {counter} of sender {sender.hex()} was seen already (or is too old)")
        else:
            seen |= 1 << (top - counter)
        _seen[sender] = (top, seen)
    return body[16:]


def decode_for_rank(data: bytes) -> HeadToRank:
    """Raises BadMessage for a frame to drop."""
    return _to_rank.decode(_verified_payload(data))


def decode_for_head(data: bytes) -> RankToHead:
    """Raises BadMessage for a frame to drop."""
    return _to_head.decode(_verified_payload(data))


_drops = [0, -1e9]  # frames dropped since the last warning, when that warning was logged


def log_dropped(logger, origin, error: Exception, every_s: float = 10.0) -> None:
    """Log a dropped frame: the first at once, then at most one warning per `every_s` with the count, so that a
    process flooding the socket cannot flood the log."""
    with _lock:
        _drops[0] += 1
        now = time.monotonic()
        if now - _drops[1] < every_s:
            return
        count, _drops[0], _drops[1] = _drops[0], 0, now
    logger.warning("dropped %d control message(s) that failed verification; latest from %s: %s", count, origin, error)


def rank_identity(rank_id: int) -> bytes:
    return f"rank-{rank_id}-{identity_suffix()}".encode()
