"""Stateless process groups, one set per epoch, built from the head's TCPStore under the epoch's prefix
(`signing.epoch_store_prefix`: f"{epoch}-<tag>/", the tag derived from the run's secret).

Never through init_process_group/WORLD: a process destroys one epoch's groups and builds the next of another size.
`cpu` (gloo) carries small control collectives (the step's agreement, KV sizing); `device` carries tensors of the
model's device (NCCL on CUDA; the same gloo group on CPU). A one-rank epoch builds no group at all.
`host_collectives` counts the control collectives this group ran: the step loop makes exactly one per step.

Gloo listens on, and tells its peers, the address of the interface this host reaches the store's host through
(`local_address_towards`), not what the hostname resolves to: on many hosts that is 127.0.1.1, which peers on
other nodes cannot reach. GLOO_SOCKET_IFNAME, where set, names the interface instead (as for torch.distributed).
"""

from __future__ import annotations

import datetime
import functools
import os
import socket

import torch
import torch.distributed as dist

from eep_hpc import signing


def connect_store(host: str, port: int, timeout_s: float = 60.0) -> dist.TCPStore:
    return dist.TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def local_address_towards(host: str) -> str:
    """The address of this host's interface that routes to `host` (a UDP connect sends nothing)."""
    family, _, _, _, addr = socket.getaddrinfo(host, 1, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        return s.getsockname()[0]


@functools.cache
def gloo_device(store_host: str):
    """The gloo device of groups whose store is at store_host."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return dist.ProcessGroupGloo.create_device(interface=os.environ["GLOO_SOCKET_IFNAME"].split(",")[0])
    return dist.ProcessGroupGloo.create_device(hostname=local_address_towards(store_host))


class GroupLost(RuntimeError):
    """A collective of the group failed: a peer died, or did not answer within the group's timeout."""


def _collective(method):
    """Any failure inside the process group surfaces as GroupLost, so callers tell a lost peer from a bug."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except GroupLost:
            raise
        except Exception as e:
            raise GroupLost(f"epoch {self.epoch} group, rank {self.rank}/{self.size}: {type(e).__name__}: {e}") from e
    return wrapper


class EpochGroup:
    def __init__(self, store: dist.Store, epoch: int, rank: int, size: int, device: torch.device, timeout_s: float = 60.0,
                 purpose: str = ""):
        """purpose names a second group of the same epoch (e.g. "xfer" for the expert transfer)."""
        self.epoch, self.rank, self.size, self.device = epoch, rank, size, device
        self.cpu = self.dev = None
        self.host_collectives = 0
        if size == 1:
            return
        timeout = datetime.timedelta(seconds=timeout_s)
        prefix = signing.epoch_store_prefix(epoch) + purpose
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        opts._devices = [gloo_device(store.host)]
        self.cpu = dist.ProcessGroupGloo(dist.PrefixStore(f"{prefix}cpu/", store), rank, size, opts)
        if device.type == "cuda":
            nccl_opts = dist.ProcessGroupNCCL.Options()
            nccl_opts._timeout = timeout
            self.dev = dist.ProcessGroupNCCL(dist.PrefixStore(f"{prefix}nccl/", store), rank, size, nccl_opts)
        else:
            self.dev = self.cpu

    def set_timeout(self, timeout_s: float) -> None:
        """How long this group's later collectives wait on a silent peer (it was built with a longer allowance for
        its members to meet). Through the backends' _set_default_timeout, as torch's own _set_pg_timeout does for
        gloo and NCCL alike."""
        timeout = datetime.timedelta(seconds=timeout_s)
        for pg in {id(self.cpu): self.cpu, id(self.dev): self.dev}.values():
            if pg is not None:
                pg._set_default_timeout(timeout)

    @_collective
    def all_reduce_max(self, values: list[int]) -> list[int]:
        if self.cpu is None:
            return values
        self.host_collectives += 1
        t = torch.tensor(values, dtype=torch.long)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MAX
        self.cpu.allreduce([t], opts).wait()
        return t.tolist()

    @_collective
    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> None:
        """Rows of `inp` split by in_splits go to each rank; rows from each rank land in `out` by out_splits."""
        if self.dev is None:
            out.copy_(inp)
            return
        self.dev.alltoall_base(out, inp, out_splits, in_splits, dist.AllToAllOptions()).wait()

    @_collective
    def broadcast(self, t: torch.Tensor, src: int) -> None:
        if self.dev is None:
            return
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.dev.broadcast([t], opts).wait()

    def destroy(self) -> None:
        for pg in {id(self.cpu): self.cpu, id(self.dev): self.dev}.values():
            if pg is not None and hasattr(pg, "shutdown"):
                try:
                    pg.shutdown()
                except Exception:  # a group whose peer already died cannot shut down cleanly
                    pass
        self.cpu = self.dev = None
