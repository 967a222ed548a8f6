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
import time
import uuid

import msgspec
import torch

from eep_hpc import signing

log = logging.getLogger("eep_hpc.weights")


class PublishedDense(msgspec.Struct):
    agent_metadata: bytes
    descriptors: bytes
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


PROGRESS_DELAY_US = 2000


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
        self._dense_reg = None
        self._expert_regs: dict[int, object] = {}  # epoch -> registration of that epoch's expert tensors

    # ---- serving --------------------------------------------------------------------------------------------

    def publish_dense(self, tensors: dict[str, torch.Tensor]) -> None:
        local = list(tensors.values())
        self._dense_reg = self.agent.register_memory(local)
        msg = PublishedDense(self.agent.get_agent_metadata(),
                             self.agent.get_serialized_descs(self.agent.get_xfer_descs(local)),
                             list(tensors), [list(t.shape) for t in local], str(local[0].dtype))
        self.store.set(dense_key(self.rank_id), signing.seal(dense_key(self.rank_id), msgspec.msgpack.encode(msg)))

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

    def fetch_dense(self, peers: list[int], tensors: dict[str, torch.Tensor], timeout_s: float = 60.0) -> tuple[int, int]:
        """Fill `tensors` from the first peer that published matching dense weights -> (peer, bytes)."""
        local = list(tensors.values())
        reg = self.agent.register_memory(local)
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
                    self._read(pub.agent_metadata, self.agent.get_xfer_descs(local),
                               self.agent.deserialize_descs(pub.descriptors), timeout_s, local[0])
                    return peer, sum(t.numel() * t.element_size() for t in local)
                except Exception as e:  # try the next peer
                    errors.append(f"rank {peer}: {type(e).__name__}: {e}")
            raise RuntimeError("; ".join(errors) or "no peers")
        finally:
            self.agent.deregister_memory(reg)

    def fetch_experts(self, epoch: int, reads: list[tuple[int, int, int, torch.Tensor, torch.Tensor]],
                      timeout_s: float = 60.0) -> int:
        """reads: (src rank id, layer, src local slot, dst w13 view [2I, D], dst w2 view [D, I]) -> bytes read.
        Destination views must lie in tensors registered by the caller (see `staging`)."""
        by_src: dict[int, list] = {}
        for r in reads:
            by_src.setdefault(r[0], []).append(r)
        total = 0
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
            self._read(pub.agent_metadata, self.agent.get_xfer_descs(local, _mem_type(rows[0][3])),
                       self.agent.get_xfer_descs(remote, pub.mem_type), timeout_s, rows[0][3])
            total += sum(n for _, n, _ in local)
        return total

    def register(self, tensors: list[torch.Tensor]):
        return self.agent.register_memory(tensors)

    def deregister(self, reg) -> None:
        self.agent.deregister_memory(reg)

    def _read(self, metadata: bytes, local, remote, timeout_s: float, like: torch.Tensor) -> None:
        name = self.agent.add_remote_agent(metadata)
        try:
            handle = self.agent.initialize_xfer("READ", local, remote, name)
            try:
                state = self.agent.transfer(handle)
                deadline = time.monotonic() + timeout_s
                while state != "DONE":
                    if state == "ERR" or time.monotonic() > deadline:
                        raise RuntimeError(f"NIXL READ ended in state {state}")
                    time.sleep(0.0002)
                    state = self.agent.check_xfer_state(handle)
            finally:
                self.agent.release_xfer_handle(handle)
        finally:
            self.agent.remove_remote_agent(name)
        if like.is_cuda:
            torch.cuda.synchronize(like.device)
