"""Non-expert weights from a serving peer to a joining rank over NIXL (one-sided READs, DRAM or VRAM).

Every serving rank registers its dense parameters (everything but the expert slots: they change per epoch and
travel with the expert transfer) with a NIXL agent once, and publishes the agent's metadata, the descriptors and
the tensor names in the head's TCPStore under `weights/<rank_id>`. A joining rank reads the same-named tensors of
its freshly built skeleton straight from a peer's memory. The checkpoint on disk is the fallback when no peer can
be read (nixl missing, no peer published, a transfer error).
"""

from __future__ import annotations

import logging
import time
import uuid

import msgspec
import torch

log = logging.getLogger("eep_hpc.weights")


class Published(msgspec.Struct):
    agent_metadata: bytes
    descriptors: bytes
    names: list[str]
    shapes: list[list[int]]
    dtype: str


def store_key(rank_id: int) -> str:
    return f"weights/{rank_id}"


def _nixl():
    from nixl._api import nixl_agent, nixl_agent_config

    return nixl_agent, nixl_agent_config


def dense_tensors(model) -> dict[str, torch.Tensor]:
    """Parameters of the model other than expert slots, deduplicated (tied embeddings count once)."""
    out, seen = {}, set()
    for name, p in model.named_parameters():
        if name.endswith(".w13") or name.endswith(".w2") or p.data_ptr() in seen:
            continue
        seen.add(p.data_ptr())
        out[name] = p.data
    return out


class WeightServer:
    """Keeps a rank's dense weights registered and published for joiners to read."""

    def __init__(self, rank_id: int, tensors: dict[str, torch.Tensor], store):
        nixl_agent, nixl_agent_config = _nixl()
        self.agent = nixl_agent(f"rank{rank_id}-{uuid.uuid4().hex[:8]}", nixl_agent_config(backends=["UCX"]))
        self.tensors = list(tensors.values())
        self.reg = self.agent.register_memory(self.tensors)
        descs = self.agent.get_xfer_descs(self.tensors)
        first = self.tensors[0]
        msg = Published(self.agent.get_agent_metadata(), self.agent.get_serialized_descs(descs), list(tensors),
                        [list(t.shape) for t in self.tensors], str(first.dtype))
        store.set(store_key(rank_id), msgspec.msgpack.encode(msg))

    def close(self) -> None:
        self.agent.deregister_memory(self.reg)


def fetch_from_peers(rank_id: int, peers: list[int], tensors: dict[str, torch.Tensor], store,
                     timeout_s: float = 60.0) -> tuple[int, int]:
    """Fill `tensors` by NIXL READs from the first peer that has published matching weights.
    Returns (peer rank id, bytes read); raises RuntimeError when no peer could be read."""
    nixl_agent, nixl_agent_config = _nixl()
    agent = nixl_agent(f"join{rank_id}-{uuid.uuid4().hex[:8]}", nixl_agent_config(backends=["UCX"]))
    local = list(tensors.values())
    reg = agent.register_memory(local)
    errors = []
    try:
        for peer in peers:
            key = store_key(peer)
            if not store.check([key]):
                errors.append(f"rank {peer} published no weights")
                continue
            pub = msgspec.msgpack.decode(store.get(key), type=Published)
            want = (list(tensors), [list(t.shape) for t in local], str(local[0].dtype))
            if (pub.names, pub.shapes, pub.dtype) != want:
                errors.append(f"rank {peer} holds differently shaped weights")
                continue
            try:
                return peer, _read(agent, pub, local, timeout_s)
            except Exception as e:  # try the next peer
                errors.append(f"rank {peer}: {type(e).__name__}: {e}")
        raise RuntimeError("; ".join(errors) or "no peers")
    finally:
        agent.deregister_memory(reg)


def _read(agent, pub: Published, local: list[torch.Tensor], timeout_s: float) -> int:
    remote_name = agent.add_remote_agent(pub.agent_metadata)
    try:
        handle = agent.initialize_xfer("READ", agent.get_xfer_descs(local), agent.deserialize_descs(pub.descriptors),
                                       remote_name)
        try:
            state = agent.transfer(handle)
            deadline = time.monotonic() + timeout_s
            while state != "DONE":
                if state == "ERR" or time.monotonic() > deadline:
                    raise RuntimeError(f"NIXL READ ended in state {state}")
                time.sleep(0.0005)
                state = agent.check_xfer_state(handle)
        finally:
            agent.release_xfer_handle(handle)
    finally:
        agent.remove_remote_agent(remote_name)
    if local[0].is_cuda:
        torch.cuda.synchronize(local[0].device)
    return sum(t.numel() * t.element_size() for t in local)
