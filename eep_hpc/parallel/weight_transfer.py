"""Weights between ranks over NIXL: one-sided READs from a serving peer's memory (DRAM on CPU, VRAM on GPU).

Each rank process has one NIXL agent (`RankAgent`). What it offers to others is registered once and published in
the head's TCPStore:
- `weights/<rank_id>`: its dense parameters (everything but the expert slots), for joining ranks;
- `experts/<epoch>/<rank_id>`: one descriptor per (MoE layer, local slot) of its expert tensors in that epoch,
  for expert copies when the placement changes (grow, shrink, rebalance).
Values are signed with the run's secret (`signing.seal`): the store has no access control, and a reader must not
be pointed at memory of a process outside the run. Readers never make the source wait: a source keeps serving while
others read it, and its old expert tensors stay alive until the commit, which comes only after every reader reported
its copies done. A dead source fails only its reader's transfer (and so the scaling event, which rolls back); no
collective is left hanging.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import deque
from typing import Callable

import msgspec
import torch

from eep_hpc import signing

log = logging.getLogger("eep_hpc.weights")


class PublishedDense(msgspec.Struct):
    agent_metadata: bytes
    mem_type: str
    regions: list[list[int]]  # per tensor: [addr, bytes, device_id] (a reader cuts its READs into pieces of them)
    names: list[str]
    shapes: list[list[int]]
    dtype: str


class PublishedExperts(msgspec.Struct):
    agent_metadata: bytes
    mem_type: str
    # slots[layer][local_slot] = [w13_addr, w13_bytes, w2_addr, w2_bytes, device_id]
    slots: list[list[list[int]]]


def dense_key(rank_id: int) -> str:
    return f"weights/{rank_id}"


def experts_key(epoch: int, rank_id: int) -> str:
    return f"experts/{epoch}/{rank_id}"


def dense_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters of the model other than expert slots, deduplicated (tied embeddings count once)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if name.endswith(".w13") or name.endswith(".w2") or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        out[name] = p.data
    return out


def _mem_type(t: torch.Tensor) -> str:
    return "VRAM" if t.is_cuda else "DRAM"


def _device_id(t: torch.Tensor) -> int:
    return (t.device.index or 0) if t.is_cuda else 0


def _regions(tensors: list[torch.Tensor]) -> list[list[int]]:
    return [[t.data_ptr(), t.numel() * t.element_size(), _device_id(t)] for t in tensors]


PROGRESS_DELAY_US = int(os.environ.get("EEP_HPC_NIXL_PROGRESS_US", "2000"))  # an A/B switch for benchmarks
READ_PIECE_S = 0.05  # with a rate cap, expert reads go in pieces of this many seconds at the cap
# Without a cap they go in pieces of at most this many bytes, READS_IN_FLIGHT at a time: each piece that ends is
# progress the reader can report (a large move on a slow link is not a hung one) and stop at.
READ_PIECE_BYTES = 256 * 2**20
READS_IN_FLIGHT = 4


def _pieces(sizes: list[int], piece: int | None) -> list[tuple[int, int]]:
    """[lo, hi) index ranges of consecutive descriptors of about `piece` bytes (None: one range of all)."""
    if not piece:
        return [(0, len(sizes))] if sizes else []
    out, lo, acc = [], 0, 0
    for i, n in enumerate(sizes):
        acc += n
        if acc >= piece:
            out.append((lo, i + 1))
            lo, acc = i + 1, 0
    if lo < len(sizes):
        out.append((lo, len(sizes)))
    return out


def _piece_bytes(gbps: float) -> int:
    return max(int(gbps * 1e9 * READ_PIECE_S), 1) if gbps else READ_PIECE_BYTES


def _cut(local: list, remote: list, piece: int | None) -> tuple[list, list]:
    """Region pairs (addr, bytes, device) cut so that none is larger than `piece` bytes: a piece then bounds every
    READ, also of one large tensor (an embedding is 594 MiB)."""
    if not piece:
        return local, remote
    out_l, out_r = [], []
    for (la, n, ld), (ra, _, rd) in zip(local, remote):
        for off in range(0, n, piece) if n else [0]:
            m = min(piece, n - off)
            out_l.append((la + off, m, ld))
            out_r.append((ra + off, m, rd))
    return out_l, out_r


def _idle_progress_thread() -> None:
    """nixl's Python agent starts its progress thread with no delay between polls, so an idle rank would burn a
    core. Clamp the delay (the thread still serves peers' READs: 2 ms adds little to a bulk transfer; measured on
    CPU: an idle agent used 0.13 s of CPU in 5 s, and 12 MB were read in 25 ms)."""
    import nixl._api as api

    cfg = api.nixlBind.nixlAgentConfig
    if getattr(cfg, "_eep_clamped", False):
        return
    prop = cfg.__dict__["pthrDelay"]
    cfg.pthrDelay = property(prop.fget, lambda self, v: prop.fset(self, max(int(v), PROGRESS_DELAY_US)))
    cfg._eep_clamped = True


class RankAgent:
    """The rank's NIXL agent: registers and publishes what it serves, and reads from peers."""

    def __init__(self, rank_id: int, store):
        from nixl._api import nixl_agent, nixl_agent_config

        _idle_progress_thread()

        self.rank_id, self.store = rank_id, store
        self.agent = nixl_agent(f"rank{rank_id}-{uuid.uuid4().hex[:8]}", nixl_agent_config(backends=["UCX"]))
        self._dense_reg = None  # (registration, regions) of the dense weights: read into by a joiner, then served
        self.dense_published = False
        self._expert_regs: dict[int, object] = {}  # epoch -> registration of that epoch's expert tensors

    # ---- serving --------------------------------------------------------------------------------------------

    def publish_dense(self, tensors: dict[str, torch.Tensor]) -> None:
        """Offer the dense weights to joiners. A joiner serves the tensors it read them into: their registration
        is kept from `fetch_dense` (registering GBs of VRAM again at its first step would hold up its peers)."""
        local = list(tensors.values())
        self._register_dense(local)
        msg = PublishedDense(self.agent.get_agent_metadata(), _mem_type(local[0]), _regions(local),
                             list(tensors), [list(t.shape) for t in local], str(local[0].dtype))
        self.store.set(dense_key(self.rank_id), signing.seal(dense_key(self.rank_id), msgspec.msgpack.encode(msg)))
        self.dense_published = True

    def _register_dense(self, local: list[torch.Tensor]) -> None:
        if self._dense_reg is not None and self._dense_reg[1] != _regions(local):  # other tensors than last time
            self.agent.deregister_memory(self._dense_reg[0])
            self._dense_reg = None
        if self._dense_reg is None:
            self._dense_reg = (self.agent.register_memory(local), _regions(local))

    def publish_experts(self, epoch: int, w13: list[torch.Tensor], w2: list[torch.Tensor], reg=None) -> None:
        """Publish this epoch's expert tensors (per MoE layer [S, 2I, D] and [S, D, I]) slot by slot. `reg` is
        their registration when they were registered as staging already: the same memory is never registered
        twice (a deregistered-then-registered range can leave peers holding stale keys)."""
        if not w13 or w13[0].shape[0] == 0:
            if reg is not None:
                self.agent.deregister_memory(reg)
            return
        self._expert_regs[epoch] = reg if reg is not None else self.agent.register_memory(list(w13) + list(w2))
        dev = _device_id(w13[0])
        slots = [[[a[s].data_ptr(), a[s].numel() * a.element_size(), b[s].data_ptr(), b[s].numel() * b.element_size(), dev]
                  for s in range(a.shape[0])] for a, b in zip(w13, w2)]
        msg = PublishedExperts(self.agent.get_agent_metadata(), _mem_type(w13[0]), slots)
        key = experts_key(epoch, self.rank_id)
        self.store.set(key, signing.seal(key, msgspec.msgpack.encode(msg)))

    def take_expert_registration(self):
        """The registration of the expert tensors published last, taken out of retirement: a commit in place
        publishes the same tensors again for its epoch (None: nothing published)."""
        return self._expert_regs.pop(max(self._expert_regs)) if self._expert_regs else None

    def retire_experts(self, keep_epoch: int) -> None:
        """Deregister expert tensors of epochs before `keep_epoch` (after a commit nobody reads them)."""
        for epoch in [e for e in self._expert_regs if e < keep_epoch]:
            self.agent.deregister_memory(self._expert_regs.pop(epoch))

    # ---- reading --------------------------------------------------------------------------------------------

    def fetch_dense(self, peers: list[int], tensors: dict[str, torch.Tensor], timeout_s: float = 60.0,
                    on_progress: Callable[[int, int], None] | None = None, gbps: float = 0.0) -> tuple[int, int]:
        """Fill `tensors` from the first peer that published matching dense weights -> (peer, bytes). READs in
        pieces as the experts' (and, with `gbps` > 0, no faster: the peer serves meanwhile); a peer fails when no
        piece ends for `timeout_s`.
        `on_progress(bytes_in, bytes_all)` after each poll: a slow link (between two processes on one GPU the
        READs go through the host's loopback socket, 0.37 GB/s idle and much less while the source serves) is
        then seen to move."""
        local = list(tensors.values())
        self._register_dense(local)  # kept for serving them (publish_dense) once they are in
        errors = []
        try:
            for peer in peers:
                if not self.store.check([dense_key(peer)]):
                    errors.append(f"rank {peer} published no weights")
                    continue
                pub = msgspec.msgpack.decode(signing.unseal(dense_key(peer), self.store.get(dense_key(peer))),
                                             type=PublishedDense)
                if (pub.names, pub.shapes, pub.dtype) != (list(tensors), [list(t.shape) for t in local], str(local[0].dtype)):
                    errors.append(f"rank {peer} holds differently shaped weights")
                    continue
                try:
                    self._read(pub.agent_metadata, _regions(local), _mem_type(local[0]), pub.regions, pub.mem_type,
                               timeout_s, local[0], on_progress, gbps)
                    return peer, sum(t.numel() * t.element_size() for t in local)
                except Exception as e:  # try the next peer
                    errors.append(f"rank {peer}: {type(e).__name__}: {e}")
            raise RuntimeError("; ".join(errors) or "no peers")
        except BaseException:
            self.agent.deregister_memory(self._dense_reg[0])
            self._dense_reg = None
            raise

    def start_fetch_experts(self, epoch: int, reads: list[tuple[int, int, int, torch.Tensor, torch.Tensor]],
                            timeout_s: float = 60.0, gbps: float = 0.0) -> PendingReads:
        """Start reading expert slots from peers -> the reads under way (poll `done()`, then `close()`).
        reads: (src rank id, layer, src local slot, dst w13 view [2I, D], dst w2 view [D, I]); destination views
        must lie in tensors registered by the caller (see `register`). READs of up to READ_PIECE_BYTES per
        source, or with a rate cap (`gbps` > 0) pieces of about READ_PIECE_S at the cap."""
        by_src: dict[int, list] = {}
        for r in reads:
            by_src.setdefault(r[0], []).append(r)
        pending = PendingReads(self.agent, timeout_s, reads[0][3] if reads else None, gbps)
        piece = _piece_bytes(gbps)
        try:
            for src, rows in by_src.items():
                key = experts_key(epoch, src)
                if not self.store.check([key]):
                    raise RuntimeError(f"rank {src} published no experts for epoch {epoch}")
                pub = msgspec.msgpack.decode(signing.unseal(key, self.store.get(key)), type=PublishedExperts)
                remote, local = [], []
                for _, layer, slot, w13, w2 in rows:
                    a13, n13, a2, n2, dev = pub.slots[layer][slot]
                    if n13 != w13.numel() * w13.element_size() or n2 != w2.numel() * w2.element_size():
                        raise RuntimeError(f"rank {src}: expert slot sizes differ from this rank's")
                    remote += [(a13, n13, dev), (a2, n2, dev)]
                    local += [(w13.data_ptr(), n13, _device_id(w13)), (w2.data_ptr(), n2, _device_id(w2))]
                self._add_pieces(pending, pub.agent_metadata, local, _mem_type(rows[0][3]), remote, pub.mem_type,
                                 piece)
        except BaseException:
            pending.close()
            raise
        return pending

    def register(self, tensors: list[torch.Tensor]):
        return self.agent.register_memory(tensors)

    def deregister(self, reg) -> None:
        self.agent.deregister_memory(reg)

    def _read(self, metadata: bytes, local: list, local_mem: str, remote: list, remote_mem: str, timeout_s: float,
              like: torch.Tensor, on_progress: Callable[[int, int], None] | None = None, gbps: float = 0.0) -> None:
        """Regions [addr, bytes, device] of the peer into the same-sized local ones, in pieces; until all are in."""
        if [n for _, n, _ in local] != [n for _, n, _ in remote]:
            raise RuntimeError("the peer's regions differ in size from this rank's")
        pending = PendingReads(self.agent, timeout_s, like, gbps)
        try:
            self._add_pieces(pending, metadata, [tuple(r) for r in local], local_mem, [tuple(r) for r in remote],
                             remote_mem, _piece_bytes(gbps))
            pending.wait(None if on_progress is None else lambda done: on_progress(done, pending.nbytes))
        finally:
            pending.close()

    def _add_pieces(self, pending: PendingReads, metadata: bytes, local: list, local_mem: str, remote: list,
                    remote_mem: str, piece: int) -> None:
        """Queue READs of the (addr, bytes, device) regions `remote` into `local`, in pieces of about `piece`
        bytes."""
        local, remote = _cut(local, remote, piece)
        for lo, hi in _pieces([n for _, n, _ in local], piece):
            pending.add(metadata, self.agent.get_xfer_descs(local[lo:hi], local_mem),
                        self.agent.get_xfer_descs(remote[lo:hi], remote_mem), sum(n for _, n, _ in local[lo:hi]))


class PendingReads:
    """NIXL READs under way. The reader polls `done()` (between serving steps, or in `wait`): nothing blocks, so a
    rank keeps serving while its next epoch's experts arrive. Pieces are posted READS_IN_FLIGHT at a time, or, with
    a rate cap (`gbps` > 0), one at a time and no faster than the cap (a piece is posted at a poll, so the rate is
    at most the cap), leaving the link to the serving traffic. `bytes_done` counts the pieces that ended; the reads
    fail when none ended for `timeout_s` (so a large move on a slow link takes as long as it needs). `close()` lets
    READs in flight end before it releases them: their destination may be freed right after; `settled()` asks
    the same without waiting."""

    def __init__(self, agent, timeout_s: float, like: torch.Tensor | None, gbps: float = 0.0):
        self.agent, self.like, self.gbps = agent, like, gbps
        self.progressed = time.monotonic()  # when a piece last ended (or the reads began)
        self.timeout_s = timeout_s
        self.nbytes = 0  # all the reads will bring
        self.bytes_done = 0  # brought by the pieces that ended
        self._queue: deque = deque()  # (peer metadata, local descs, remote descs, bytes): not posted yet
        self._inflight: list[list] = []  # [handle, last state, bytes]
        self._peers: dict[bytes, str] = {}  # metadata -> remote agent name
        self._next_at = 0.0
        self.unknown = False  # checking the states failed: whether READs are in flight is not known

    def add(self, metadata: bytes, local, remote, nbytes: int) -> None:
        """Queue one READ (local and remote descriptor lists of the same sizes) and post what the window allows."""
        self._queue.append((metadata, local, remote, nbytes))
        self.nbytes += nbytes
        self._post()

    def _post(self) -> None:
        window = 1 if self.gbps else READS_IN_FLIGHT
        while self._queue and len(self._inflight) < window and (not self.gbps or time.monotonic() >= self._next_at):
            metadata, local, remote, nbytes = self._queue.popleft()
            if metadata not in self._peers:
                self._peers[metadata] = self.agent.add_remote_agent(metadata)
            handle = self.agent.initialize_xfer("READ", local, remote, self._peers[metadata])
            self._inflight.append([handle, "PROC", nbytes])
            self._inflight[-1][1] = self.agent.transfer(handle)
            if self.gbps:
                self._next_at = time.monotonic() + nbytes / (self.gbps * 1e9)

    def _check(self) -> None:
        """Update the states of the READs in flight; release those done."""
        for t in self._inflight:
            if t[1] not in ("DONE", "ERR"):
                t[1] = self.agent.check_xfer_state(t[0])
        finished = [t for t in self._inflight if t[1] == "DONE"]
        self._inflight = [t for t in self._inflight if t[1] != "DONE"]
        for handle, _, nbytes in finished:
            self.agent.release_xfer_handle(handle)
            self.bytes_done += nbytes
            self.progressed = time.monotonic()

    def done(self) -> bool:
        """-> whether every READ finished; raises when one failed or none ended for `timeout_s`."""
        self._check()
        if any(t[1] == "ERR" for t in self._inflight):
            raise RuntimeError("NIXL READ ended in state ERR")
        self._post()
        if not self._inflight and not self._queue:
            if self.like is not None and self.like.is_cuda:
                torch.cuda.synchronize(self.like.device)
            return True
        stalled = time.monotonic() - max(self.progressed, self._next_at if self.gbps else 0.0)
        if stalled > self.timeout_s:
            raise RuntimeError(f"NIXL READ: no piece ended in {self.timeout_s:g} s "
                               f"({self.bytes_done} of {self.nbytes} bytes in)")
        return False

    def wait(self, on_progress: Callable[[int], None] | None = None) -> None:
        """Until every READ finished; `on_progress(bytes_done)` after each poll."""
        while not self.done():
            if on_progress is not None:
                on_progress(self.bytes_done)
            time.sleep(0.0002)

    def settled(self) -> bool:
        """Post nothing more; -> whether no READ is still in flight (each ended, done or failed). Never waits."""
        self._queue.clear()
        try:
            self._check()
        except Exception as e:
            log.warning("checking a NIXL READ failed: %s", e)
            self.unknown = True
            return False
        return all(t[1] == "ERR" for t in self._inflight)

    def close(self, wait_s: float = 10.0) -> bool:
        """Drop what is not posted, let the READs in flight end (done or failed, up to `wait_s`), release them and
        forget the peers -> whether every READ is over. False: some may still write into their destination, which
        the caller must then keep alive (and registered)."""
        end = time.monotonic() + wait_s
        while not self.settled() and not self.unknown and time.monotonic() < end:
            time.sleep(0.001)
        over = True
        for handle, state, _ in self._inflight:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception as e:  # nixl could not cancel it: it may still be writing
                over = False
                log.warning("a NIXL READ in state %s could not be released: %s", state, e)
        self._inflight = []
        peers, self._peers = self._peers, {}
        for name in peers.values():
            try:
                self.agent.remove_remote_agent(name)
            except Exception as e:
                log.warning("forgetting NIXL peer %s failed: %s", name, e)
        return over
