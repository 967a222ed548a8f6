"""The head's link to its ranks and node agents: the ROUTER socket they connect to (one DEALER each), the TCPStore
master where each epoch's groups meet (`Epoch.store_host/port`), and the beacon that pings the ranks from a thread
of its own (beacon.py; each rank connects one more DEALER to it).

Every frame is signed with the run's secret (signing.py); a frame that does not verify, was seen before, or has
an unexpected shape is dropped and counted, and never ends the receive loop (anyone on the cluster can connect).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.distributed as dist
import zmq
import zmq.asyncio

from eep_hpc import protocol as P
from eep_hpc import signing
from eep_hpc.head.beacon import HeadBeacon
from eep_hpc.parallel.eplb import Placement

log = logging.getLogger("eep_hpc.coordinator")


class RankLink:
    def __init__(self, host: str, zmq_port: int = 0, store_port: int = 0, beacon_port: int = 0,
                 heartbeat_s: float = 1.0):
        self.host, self._zmq_port, self._store_port = host, zmq_port, store_port
        self.beacon = HeadBeacon(host, beacon_port, heartbeat_s)
        self.address = ""  # tcp://host:port of the ROUTER socket, once open
        self.store: dist.TCPStore | None = None
        self.dropped = 0  # control frames refused (unsigned, forged, replayed, malformed), for status
        self.api_addresses: list[str] = []  # where ranks send outputs for the head's other API processes

    def open(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        if self._zmq_port:
            self._sock.bind(f"tcp://{self.host}:{self._zmq_port}")
        else:
            self._sock.bind_to_random_port(f"tcp://{self.host}")
        self.address = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.store = dist.TCPStore(self.host, self._store_port, is_master=True, wait_for_workers=False)
        self.beacon.open()

    def close(self) -> None:
        self.beacon.close()
        self._sock.close(linger=0)
        self._ctx.term()
        self.store = None

    def epoch(self, number: int, rank_ids: list[int], placement: Placement) -> P.Epoch:
        """The Epoch message of these members and placement: its groups meet at this link's store."""
        return P.Epoch(epoch=number, rank_ids=list(rank_ids), store_host=self.host, store_port=self.store.port,
                       physical_to_logical=placement.physical_to_logical.tolist(),
                       slot_offsets=list(placement.slot_offsets))

    def send(self, rank_id: int, msg) -> None:
        """Never waits. Sends go through the asyncio socket itself: ZMQ's readiness signal is edge-triggered, and
        an operation behind the event loop's back (e.g. on a shadow socket) can swallow the edge the pending
        receive is waiting for."""
        fut = self._sock.send_multipart([signing.rank_identity(rank_id), signing.encode(msg)], flags=zmq.NOBLOCK)
        name = type(msg).__name__

        def check(f):
            if not f.cancelled() and f.exception() is not None:  # not connected (yet, or any more)
                log.debug("cannot send %s to rank %d: %s", name, rank_id, f.exception())

        fut.add_done_callback(check)

    async def receive(self, handle: Callable[[P.RankToHead], None]) -> None:
        """Hand every verified message to `handle`, until cancelled."""
        while True:
            sender, *frames = await self._sock.recv_multipart()
            try:
                if len(frames) != 1:  # anyone can connect: no frame layout may end this loop
                    raise signing.BadMessage(f"{len(frames)} frames, not 1")
                handle(signing.decode_for_head(frames[0]))
            except signing.BadMessage as e:
                self.dropped += 1
                signing.log_dropped(log, sender[:64], e)
            except Exception:
                log.exception("bad message from a rank")
