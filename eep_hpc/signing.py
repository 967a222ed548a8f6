"""Signed frames: the run's secret, HMAC-SHA256 signatures with replay checks on every control message, routing
identities only holders of the secret can compute, and sealed values in the TCPStore.

Anyone on the cluster can connect to the head's ROUTER socket, so every frame is signed with the run's secret
(32 random bytes the head writes to <run_dir>/control-secret, mode 600; ranks and node agents read that file,
never argv or the environment). A frame is

    tag (32 bytes) | sender (8 bytes) | counter (8 bytes, big-endian) | msgpack payload (a protocol.py message)

with tag = HMAC-SHA256(secret, sender | counter | payload). `sender` is random per process and `counter` counts
the frames it encoded, so a receiver takes each (sender, counter) once: a frame recorded on the wire and sent
again is dropped. Counters may arrive out of order by up to REPLAY_WINDOW frames (one process may encode on
several threads); older ones are dropped too. A thread that sends on a socket of its own (the head's beacon) signs
as a `Sender` of its own, so its frames, on their own channel, never fall behind the process's others by a window. No clocks are compared, so node clocks need not agree.
Routing identities are derived from the secret as well (`identity_suffix`), so a process without it cannot take
a rank's identity on the ROUTER socket before the rank connects.
"""

from __future__ import annotations

import hmac
import itertools
import os
import secrets
import threading
import time
from pathlib import Path

import msgspec

from eep_hpc.protocol import HeadToRank, RankToHead

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


_encoder = msgspec.msgpack.Encoder()
_to_rank = msgspec.msgpack.Decoder(HeadToRank)
_to_head = msgspec.msgpack.Decoder(RankToHead)

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
        raise RuntimeError("no control secret installed in this process (signing.use_secret): the head and its "
                           "ranks sign every message with the run's secret")
    return hmac.digest(_secret, data, "sha256")


def write_private(path: str | Path, data: str | bytes) -> Path:
    """Write a file only its owner can read (mode 600, also when it existed with another mode)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path.resolve()


def write_secret(path: str | Path, secret: bytes) -> Path:
    """Write a secret (hex) to a file only this user can read (mode 600, also when the file existed)."""
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


class Sender:
    """A sequence of signed frames of its own: a random sender id and its own counter (encode(msg, sender))."""

    def __init__(self):
        self.id, self.counter = os.urandom(8), itertools.count(1)


def encode(msg: HeadToRank | RankToHead, sender: Sender | None = None) -> bytes:
    if sender is None:
        body = _sender + next(_counter).to_bytes(8, "big") + _encoder.encode(msg)
    else:
        body = sender.id + next(sender.counter).to_bytes(8, "big") + _encoder.encode(msg)
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


def decode_as(decoder: msgspec.msgpack.Decoder, data: bytes):
    """A frame of another union (the head's API processes: protocol.ApiToHead, HeadToApi); raises BadMessage for a
    frame to drop."""
    try:
        return decoder.decode(_verified_payload(data))
    except msgspec.DecodeError as e:
        raise BadMessage(f"not a message of this channel: {e}") from None


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
    """A rank's routing identity on the head's ROUTER socket (its DEALER's)."""
    return f"rank-{rank_id}-{identity_suffix()}".encode()


def api_identity(api: int) -> bytes:
    """An extra API process's routing identity on the head's API link (serve.api_servers > 1)."""
    return f"api-{api}-{identity_suffix()}".encode()
