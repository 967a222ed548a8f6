"""The head's beacon: a thread of its own that pings every live rank each heartbeat, on a ROUTER socket of its own.

A rank that hears nothing from the head for control.head_timeout_s exits (the head is gone). The head's event loop
streams every token as well as coordinating, and a loop far behind its streams (one bench-head run with 2,048
streams) went 15 s without a turn for the heartbeat, and every rank left. The beacon keeps pinging while the loop is
starved (a busy loop still lets other threads run between GIL switches), so what a rank's timeout watches is the
head process and its link, as the ranks' own beacons (rank/beacon.py) show theirs to the head.

What stays on the loop (health.py): judging ranks, and which ranks are pinged (`ping_only`, each heartbeat round and
at once when a rank is declared lost, so a rank cut off stops hearing the head and leaves by itself). A rank answers
each Ping with a Pong on its main socket (its stats), handled by the loop like every other message.

The rank side is one more DEALER (identity `signing.rank_identity`) connected to `address`; its main loop polls it
next to its main socket. Frames are signed as every other (a `signing.Sender` of the beacon's own).
"""

from __future__ import annotations

import threading
import time

import zmq

from eep_hpc import protocol as P
from eep_hpc import signing


class HeadBeacon:
    def __init__(self, host: str, port: int, every_s: float):
        self.host, self.port, self.every_s = host, port, every_s
        self.address = ""  # tcp://host:port ranks connect to, once open
        self._ranks: frozenset[int] = frozenset()  # replaced whole by the loop, read by the thread
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="head-beacon", daemon=True)

    def open(self) -> None:
        """Bind (here, so that the address is known before ranks launch) and start the thread, which alone uses the
        socket from then on."""
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)  # unroutable (not yet connected) and over-HWM pings are dropped
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 4)  # a rank that reads nothing gets a few stale pings, not thousands
        if self.port:
            self._sock.bind(f"tcp://{self.host}:{self.port}")
        else:
            self._sock.bind_to_random_port(f"tcp://{self.host}")
        self.address = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._thread.start()

    def ping_only(self, rank_ids) -> None:
        """From the next beat on, ping these ranks (and no others)."""
        self._ranks = frozenset(rank_ids)

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._stop.set()
        self._thread.join(self.every_s + 5)
        self._ctx.term()

    def _run(self) -> None:
        sender = signing.Sender()
        identities: dict[int, bytes] = {}
        try:
            while not self._stop.wait(self.every_s):
                for rank_id in self._ranks:
                    if rank_id not in identities:
                        identities[rank_id] = signing.rank_identity(rank_id)
                    frame = signing.encode(P.Ping(sent_at=time.time()), sender)
                    self._sock.send_multipart([identities[rank_id], frame], zmq.NOBLOCK)
        finally:
            self._sock.close(linger=0)
