"""MoE dispatch/combine over nixl_ep's low-latency kernels (NVLink or RDMA through NIXL): the GPU backend.

Same semantics as `TorchAllToAll` (all_to_all.py). nixl_ep is imported lazily, so this module imports on CPU.

Glossary
- seat: a process's rank number inside nixl_ep (`Buffer(rank=seat)`). Claimed once per process in the head's
  TCPStore (key "nixl_ep/seat/{s}" = owner rank id, or "free") and kept across epochs, so that peers are added
  (`connect_ranks`) and removed (`disconnect_ranks`) without renumbering anyone. Epoch rank i sits in seats[i];
  seats may have gaps (they are masked).
- nixl expert: nixl_ep numbers experts seat * E + j, E = experts per seat. Physical slot slot_offsets[i] + j of
  epoch rank i is nixl expert seats[i] * E + j; a rank with fewer than E slots leaves the rest empty.
- geometry: (seats, E, max tokens per dispatch, hidden). Peers write into each other's buffers at offsets computed
  from it, so all buffers of a service share one, kept in the store ("nixl_ep/geometry"). It only grows: a
  membership it cannot hold (more seats, more slots on one rank) rebuilds every member's buffer.

Entering an epoch (at startup and at every commit, all members together; `NixlEpRuntime.enter`):
 1. keep or claim a seat; publish it under f"{epoch}/nixl_ep/seat/{i}"; read the others'.
 2. geometry = max(stored, what this epoch needs); a member whose buffer differs rebuilds it.
 3. publish (buffer incarnation, peers connected); a pair of members connected on both sides stays; every other
    pair connects (a handshake both sides make, metadata through the store under f"{epoch}/nixl_ep/md");
    connections to non-members (ranks that left or failed) are dropped.
 4. masks: connected peers on, everyone else off (`clean_mask_buffer`); a barrier; then the seats of departed
    peers are freed for later joiners.

Data path, with no host sync and no host collective (CUDA-graph capturable): `low_latency_dispatch` delivers
recv_x [E, R*Tmax, D] (R = the geometry's seats, or the highest member seat + 1 without
`nixl_ep_fixed_layout`; Tmax the buffer's tokens per dispatch) with the rows of local expert e packed at the
front, recv_count[e] of them, on the device. The experts run on that layout as it is
(`ops.swiglu_experts_batched`: blocks of rows per expert, the counts read on the GPU), writing their outputs in
the same layout, which `low_latency_combine` reads to return the weighted sum over k (fp32, k = 0, 1, ...).
Top-k entries of -1 (a graph's padding rows) are not sent. A step bigger than Tmax tokens runs its MoE in chunks
the ranks agreed on (parallel/step_plan.py).

Failures: a peer that stops answering inside dispatch/combine is masked by the kernels after the timeout (its
experts then contribute nothing); `failed_ranks()` reads the masks so the rank process can report the peer lost.
"""

from __future__ import annotations

import atexit
import datetime
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from eep_hpc.config import Config, ConfigError
from eep_hpc.kernels import ops
from eep_hpc.parallel.all_to_all import TorchAllToAll
from eep_hpc.parallel.expert_map import ExpertMap
from eep_hpc.parallel.groups import EpochGroup, connect_store

log = logging.getLogger("eep_hpc.nixl_ep")

# hidden sizes nixl-cu13 1.4.1 compiles its low-latency kernels for (nixl_ep_cpp: dispatch<..., kHidden>)
SUPPORTED_HIDDEN = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
NUM_MAX_NVL_PEERS = 8  # nixl_ep asserts num_ranks < 8 or num_ranks % 8 == 0
# between dropping a peer and connecting the same seat again (nixl's elastic test pauses 5 s there: metadata
# invalidation racing the re-add); only a peer that was half-connected or rebuilt its buffer pays it
RECONNECT_PAUSE_S = 2.0


def import_nixl_ep():
    try:
        import nixl_ep
    except Exception as e:  # ImportError, or a CUDA library that fails to load
        raise ConfigError(f'parallel.backend = "nixl_ep", but nixl_ep does not import here ({type(e).__name__}: '
                          f'{e}); install nixl-cu13 (it ships nixl_ep) or use backend = "torch"') from e
    return nixl_ep


def check_backend(cfg: Config, hidden: int, checkpoint_dtype: torch.dtype, device: torch.device) -> None:
    """Fail at startup, naming the problem, where nixl_ep cannot serve this model here."""
    if device.type != "cuda":
        raise ConfigError(f'parallel.backend = "nixl_ep" needs CUDA GPUs, but this rank runs on {device} '
                          '(use backend = "torch" on CPU)')
    if hidden not in SUPPORTED_HIDDEN:
        raise ConfigError(f'parallel.backend = "nixl_ep": the model\'s hidden size {hidden} is not one nixl_ep\'s '
                          f'kernels support {SUPPORTED_HIDDEN}; use backend = "torch"')
    dtype = cfg.model.dtype
    if dtype in ("float32", "float16") or (dtype == "auto" and checkpoint_dtype == torch.float16):
        raise ConfigError(f'parallel.backend = "nixl_ep" moves bfloat16 activations only; set model.dtype = '
                          f'"bfloat16" (now "{dtype}")')


@dataclass(frozen=True)
class Geometry:
    seats: int
    experts_per_seat: int
    max_tokens: int
    hidden: int

    def merge(self, other: Geometry | None) -> Geometry:
        if other is None:
            return self
        return Geometry(*(max(a, b) for a, b in zip(self.astuple(), other.astuple())))

    def astuple(self) -> tuple[int, int, int, int]:
        return self.seats, self.experts_per_seat, self.max_tokens, self.hidden

    def encode(self) -> str:
        return ",".join(map(str, self.astuple()))

    @staticmethod
    def decode(s: str) -> Geometry:
        return Geometry(*map(int, s.split(",")))


def seat_capacity(n: int) -> int:
    return n if n < NUM_MAX_NVL_PEERS else -(-n // NUM_MAX_NVL_PEERS) * NUM_MAX_NVL_PEERS


def required_geometry(cfg: Config, hidden: int, seats: list[int], slot_offsets: list[int],
                      stored: Geometry | None) -> Geometry:
    """What an epoch needs, merged with what the service already has (so that it only grows)."""
    p = cfg.parallel
    want_seats = max(p.nixl_ep_max_ranks or max(p.ranks, cfg.adapt.max_ranks, 2), max(seats) + 1)
    local_slots = max(b - a for a, b in itertools.pairwise(slot_offsets))
    e = cfg.engine
    largest_graph = (e.cuda_graph_max_batch or e.max_num_seqs) if e.cuda_graphs else 0
    max_tokens = -(-max(p.moe_chunk_tokens, largest_graph) // 4) * 4  # nixl_ep: R * Tmax must be a multiple of 4
    merged = Geometry(want_seats, max(local_slots, 1), max_tokens, hidden).merge(stored)
    return replace(merged, seats=seat_capacity(merged.seats))


def slot_to_nixl_expert(slot_offsets: list[int], seats: list[int], experts_per_seat: int) -> torch.Tensor:
    """[S]: the nixl expert id of every physical slot."""
    out = []
    for i, seat in enumerate(seats):
        n = slot_offsets[i + 1] - slot_offsets[i]
        out.extend(seat * experts_per_seat + j for j in range(n))
    return torch.tensor(out, dtype=torch.long)


def pairs_to_connect(my_seat: int, my_token: str, my_peers: dict[int, str], records: list[dict]) -> list[int]:
    """Seats of members this rank must (re)connect: all but those connected on both sides with the current buffers.
    records[i] = {"seat", "token", "peers": {seat: token}} of epoch rank i (this rank's own included). Symmetric:
    if A lists B, B lists A (both sides evaluate the same condition)."""
    out = []
    for r in records:
        if r["seat"] == my_seat:
            continue
        both = my_peers.get(r["seat"]) == r["token"] and r["peers"].get(str(my_seat)) == my_token
        if not both:
            out.append(r["seat"])
    return out


class NixlEpRuntime:
    """The one nixl_ep Buffer of this process, its seat and its connections, across epochs."""

    def __init__(self, cfg: Config, store: dist.Store, rank_id: int, nixl, device: torch.device):
        """nixl: the nixl_ep module (tests pass a stand-in); device: this process's GPU."""
        self.cfg, self.store, self.owner, self.nixl, self.device = cfg, store, str(rank_id), nixl, device
        self.timeout_ms = int(cfg.control.rank_timeout_s * 1000)
        self.seat: int | None = None
        self.buffer = None
        self.geometry: Geometry | None = None
        self.incarnation = 0  # buffers built by this process (a rebuild gives peers a new token to connect to)
        self.peers: dict[int, str] = {}  # seat -> token of the peer buffer ours is connected to

    @property
    def token(self) -> str:
        return f"{self.owner}.{self.incarnation}"

    # ---- seats ---------------------------------------------------------------------------------------------

    def _seat_key(self, s: int) -> str:
        return f"nixl_ep/seat/{s}"

    def _take(self, s: int) -> bool:
        got = self.store.compare_set(self._seat_key(s), "", self.owner).decode()  # sets it when missing
        if got == "free":
            got = self.store.compare_set(self._seat_key(s), "free", self.owner).decode()
        return got == self.owner

    def _keep_or_claim_seat(self, hint: int) -> None:
        """hint: the seat to try first (the epoch rank: a first epoch seats rank i in seat i)."""
        if self.seat is not None:
            if self._take(self.seat):  # still ours, or freed meanwhile (peers dropped us) and taken back
                return
            log.warning("nixl_ep seat %d went to another rank; claiming a new one", self.seat)
            self._destroy_buffer()
        s = hint
        if not self._take(s):
            s = 0
            while not self._take(s):
                s += 1
        self.seat = s

    def _free_seat(self, s: int, owner: str) -> None:
        self.store.compare_set(self._seat_key(s), owner, "free")

    # ---- buffer --------------------------------------------------------------------------------------------

    def _destroy_buffer(self) -> None:
        if self.buffer is not None:
            self.buffer.destroy()
        self.buffer, self.geometry, self.peers = None, None, {}

    def _build_buffer(self, g: Geometry) -> None:
        self._destroy_buffer()
        nbytes = self.nixl.Buffer.get_low_latency_buffer_size_hint(g.max_tokens, g.hidden, g.seats,
                                                                   g.seats * g.experts_per_seat)
        buf = self.nixl.Buffer(rank=self.seat, explicitly_destroy=True, timeout_ms=self.timeout_ms)
        buf.update_memory_buffers(num_ranks=g.seats, num_experts_per_rank=g.experts_per_seat, num_rdma_bytes=nbytes)
        self.buffer, self.geometry = buf, g
        self.incarnation += 1
        log.info("nixl_ep buffer: seat %d of %d, %d experts per seat, %d tokens x %d hidden: %.1f MiB", self.seat,
                 g.seats, g.experts_per_seat, g.max_tokens, g.hidden, nbytes / 2**20)

    def _disconnect(self, seats: list[int]) -> dict[int, str]:
        gone = {s: self.peers.pop(s) for s in seats}
        if gone:
            self.buffer.disconnect_ranks(list(gone))
        return gone

    # ---- epochs --------------------------------------------------------------------------------------------

    def enter(self, epoch: int, me: int, group: EpochGroup, slot_offsets: list[int], hidden: int) -> list[int]:
        """Make the buffer serve epoch `epoch` (this process is epoch rank `me`). Returns every member's seat."""
        n = len(slot_offsets) - 1
        if n == 1:  # alone: nothing moves between ranks; drop whoever was connected (they left)
            departed = self._disconnect(list(self.peers)) if self.buffer is not None else {}
            for s, token in departed.items():
                self._free_seat(s, token.split(".")[0])
            return [self.seat if self.seat is not None else 0]
        es = dist.PrefixStore(f"{epoch}/nixl_ep", self.store)
        self._keep_or_claim_seat(hint=me)
        seats = [int(v) for v in self._all_gather(es, "seat", me, n, str(self.seat))]
        stored = Geometry.decode(self.store.get("nixl_ep/geometry").decode()) \
            if self.store.check(["nixl_ep/geometry"]) else None
        geometry = required_geometry(self.cfg, hidden, seats, slot_offsets, stored)
        self.store.set("nixl_ep/geometry", geometry.encode())  # every member writes the same value
        if self.geometry != geometry:
            self._build_buffer(geometry)
        mine = {"seat": self.seat, "token": self.token, "peers": {str(s): t for s, t in self.peers.items()}}
        records = [json.loads(v) for v in self._all_gather(es, "member", me, n, json.dumps(mine))]
        new = pairs_to_connect(self.seat, self.token, self.peers, records)
        members = {r["seat"]: r["token"] for r in records}
        departed = self._disconnect([s for s in self.peers if s not in members])
        if self._disconnect([s for s in new if s in self.peers]):  # half-open or stale: both sides connect afresh
            time.sleep(RECONNECT_PAUSE_S)
        if new:
            self.buffer.set_tcp_store_group(dist.PrefixStore(f"{epoch}/nixl_ep/md", self.store))
            self.buffer.connect_ranks(new)
            self.peers.update({s: members[s] for s in new})
        self.buffer.clean_mask_buffer()  # connected peers unmasked (a timed-out member gets another chance)
        group.all_reduce_max([0])  # barrier: every member connected and past its seat claim
        for s, token in departed.items():
            self._free_seat(s, token.split(".")[0])
        return seats

    def _all_gather(self, es: dist.Store, name: str, me: int, n: int, value: str) -> list[bytes]:
        """Through the store: members reach here minutes apart at worst (a model still loading at startup)."""
        es.set(f"{name}/{me}", value)
        keys = [f"{name}/{i}" for i in range(n)]
        es.wait(keys, datetime.timedelta(seconds=self.cfg.control.load_timeout_s))
        return es.multi_get(keys)

    def masked_seats(self) -> list[int]:
        if self.buffer is None:
            return []
        mask = torch.zeros(self.geometry.seats, dtype=torch.int32, device=self.device)
        self.buffer.query_mask_buffer(mask)
        return [s for s, m in enumerate(mask.tolist()) if m]

    def mask(self, seat: int) -> None:
        self.buffer.update_mask_buffer(seat, True)

    def close(self) -> None:
        """At process exit: release the buffer and the seat (survivors also free it when they drop this rank)."""
        try:
            self._destroy_buffer()
            if self.seat is not None:
                self._free_seat(self.seat, self.owner)
        except Exception as e:  # the head (and its store) may be gone already
            log.debug("nixl_ep close: %s", e)


_runtime: NixlEpRuntime | None = None


def process_runtime(cfg: Config, store_host: str, store_port: int, rank_id: int,
                    device: torch.device) -> NixlEpRuntime:
    """The process's runtime: one GPU, one buffer, kept across epochs (built on first use)."""
    global _runtime
    if _runtime is None:
        nixl = import_nixl_ep()
        store = connect_store(store_host, store_port, timeout_s=cfg.control.rank_timeout_s)
        _runtime = NixlEpRuntime(cfg, store, rank_id, nixl, device)
        atexit.register(_runtime.close)
    return _runtime


@dataclass
class NixlEpHandle:
    topk: torch.Tensor  # [T', k] nixl expert ids (T' = max(T, 1): an empty batch sends one row that selects none)
    nixl: tuple  # nixl_ep's own dispatch handle
    num_tokens: int
    top_k: int
    capacity: int  # tokens per rank of this dispatch, agreed by every rank (the step plan): no sender sends more


class NixlEpAllToAll:
    """The AllToAll of one epoch over the process's nixl_ep buffer (a one-rank epoch moves nothing)."""

    def __init__(self, runtime: NixlEpRuntime, rank_ids: list[int], me: int, seats: list[int],
                 expert_map: ExpertMap, group: EpochGroup):
        self.runtime, self.rank_ids, self.me, self.seats = runtime, rank_ids, me, seats
        self.local = TorchAllToAll(group) if len(rank_ids) == 1 else None
        self.max_tokens = 0  # tokens per rank one dispatch carries (0: a one-rank epoch, no limit)
        if self.local is None:
            g = runtime.geometry
            self.buffer, self.max_tokens = runtime.buffer, g.max_tokens
            # the layout covers every seat of the geometry, members or not (absent seats are masked): kernels,
            # buffers and shapes stay the same when ranks join or leave, so graphs are kept (nixl 1.4.1 honours
            # an explicit num_experts for this); else up to the highest member seat, which a grow may move
            fixed = runtime.cfg.parallel.nixl_ep_fixed_layout
            self.num_experts = g.experts_per_seat * (g.seats if fixed else max(seats) + 1)
            self.incarnation = runtime.incarnation  # of the buffer this epoch's graphs use
            self.expert_of_slot = slot_to_nixl_expert(expert_map.slot_offsets, seats, g.experts_per_seat).to(
                expert_map.slot_owner.device)
            self.topk_dtype = getattr(runtime.nixl, "topk_idx_t", torch.int64)

    @classmethod
    def for_epoch(cls, cfg: Config, arch, epoch, group: EpochGroup, expert_map: ExpertMap) -> NixlEpAllToAll:
        """epoch: the P.Epoch being entered; arch: the model's MoEArch (hidden size, checkpoint dtype)."""
        check_backend(cfg, arch.hidden_size, arch.torch_dtype, group.device)
        runtime = process_runtime(cfg, epoch.store_host, epoch.store_port, epoch.rank_ids[group.rank], group.device)
        seats = runtime.enter(epoch.epoch, group.rank, group, expert_map.slot_offsets, arch.hidden_size)
        return cls(runtime, list(epoch.rank_ids), group.rank, seats, expert_map, group)

    @property
    def graph_safe(self) -> bool:
        """nixl_ep's low-latency kernels are capturable, and nothing here syncs with the host."""
        return True

    @property
    def graph_key(self) -> tuple:
        """A graph captured in another epoch serves this one when it used the same buffer (same incarnation: not
        rebuilt) with the same expert numbering; nixl_ep keeps graphs valid across connect/disconnect of peers."""
        if self.local is not None:
            return ("one rank",)
        return ("nixl_ep", self.incarnation, self.num_experts, self.max_tokens)

    def adopt_tensors(self, old: NixlEpAllToAll) -> None:
        """Write this epoch's slot numbering into `old`'s device tensor and use that (CUDA graphs captured it)."""
        if self.local is not None or old.local is not None:  # one rank: no numbering (and no graph kept across)
            return
        if old.expert_of_slot.shape != self.expert_of_slot.shape:  # `can_replace` compares the slot tables first
            raise ValueError(f"kept graphs read a slot numbering of {tuple(old.expert_of_slot.shape)}, this epoch "
                             f"has {tuple(self.expert_of_slot.shape)}")
        self.expert_of_slot = old.expert_of_slot.copy_(self.expert_of_slot)

    @property
    def weights_dtype(self) -> torch.dtype | None:
        return None if self.local is not None else torch.float32  # low_latency_combine reads fp32 weights

    def to_destinations(self, slots: torch.Tensor) -> torch.Tensor:
        """Physical slots -> nixl expert ids (in nixl_ep's index dtype); -1 stays -1 (not sent)."""
        if self.local is not None:
            return slots
        return torch.where(slots >= 0, self.expert_of_slot[slots.clamp_min(0)], -1).to(self.topk_dtype)

    def dispatch(self, x, slots, slot_owner, local_start, capacity):
        if self.local is not None:
            return self.local.dispatch(x, slots, slot_owner, local_start, capacity)
        T, k = slots.shape
        if T > self.max_tokens:
            raise ValueError(f"{T} tokens in one dispatch, nixl_ep's buffer holds {self.max_tokens} "
                             "(parallel.moe_chunk_tokens; the step plan cuts bigger steps into chunks)")
        if x.dtype != torch.bfloat16:
            raise TypeError(f"nixl_ep dispatches bfloat16 activations, got {x.dtype}")
        topk = slots if slots.dtype == self.topk_dtype else slots.to(self.topk_dtype)  # already nixl expert ids
        if T == 0:  # every member takes part in every dispatch: send one row that selects no expert
            x, topk = x.new_zeros(1, x.shape[1]), topk.new_full((1, k), -1)
        recv_x, recv_count, nixl_handle, _, _ = self.buffer.low_latency_dispatch(
            x.contiguous(), topk.contiguous(), self.max_tokens, num_experts=self.num_experts, use_fp8=False)
        return recv_x, recv_count, NixlEpHandle(topk, nixl_handle, T, k, max(capacity, T, 1))

    def run_experts(self, rows, local_slot, w13, w2, scales, handle):
        if self.local is not None:
            return self.local.run_experts(rows, local_slot, w13, w2, scales, handle)
        # rows: recv_x [E, R*Tmax, D], local_slot: recv_count [E] (on the device). Each of the R seats sends at
        # most `capacity` tokens, each to up to top_k of this rank's E experts: that bounds the rows that arrive
        E = rows.shape[0]
        max_rows = (self.num_experts // E) * handle.capacity * min(handle.top_k, E)
        return ops.swiglu_experts_batched(rows, local_slot, w13, w2, scales,
                                          rows_hint=max(1, handle.num_tokens) * handle.top_k, max_rows=max_rows)

    def combine(self, y, weights, handle):
        if self.local is not None:
            return self.local.combine(y, weights, handle)
        w = weights if handle.num_tokens else weights.new_zeros(1, weights.shape[1])
        out, _, _ = self.buffer.low_latency_combine(y, handle.topk, w.float().contiguous(), handle.nixl)
        return out[: handle.num_tokens]

    def experts_combined(self, rows, local_slot, weights, w13, w2, scales, handle):
        if self.local is not None:
            return self.local.experts_combined(rows, local_slot, weights, w13, w2, scales, handle)
        return self.combine(self.run_experts(rows, local_slot, w13, w2, scales, handle), weights, handle)

    # ---- failure handling ----------------------------------------------------------------------------------

    def failed_ranks(self) -> list[int]:
        """Rank ids of this epoch's peers that nixl_ep masked (they timed out inside a dispatch/combine)."""
        if self.local is not None:
            return []
        masked = set(self.runtime.masked_seats())
        return [rid for i, (rid, s) in enumerate(zip(self.rank_ids, self.seats)) if i != self.me and s in masked]

    def mask_ranks(self, rank_ids: list[int]) -> None:
        """Stop exchanging with these peers now (declared dead): their experts contribute nothing until the next
        epoch re-forms without them."""
        if self.local is None:
            for rid in rank_ids:
                self.runtime.mask(self.seats[self.rank_ids.index(rid)])
