"""The rank's beacon: a thread of its own that sends the head `RankAlive` every heartbeat on a socket of its own.

The head declares a rank dead after control.rank_timeout_s without a message. The rank's main loop answers pings
between steps, but it is deaf while it loads weights, stages a joining model or waits in a collective on a slow
peer; the beacon keeps speaking then (those calls release the GIL), so the head's bound can be a few heartbeats
without counting a busy rank as lost. What the beacon shows is that the process runs and its link to the head
works: a rank behind a cut link, stopped, or gone falls silent; a main loop that stopped making progress is found by
its group's collective timeout and the scaling events' own timeouts instead.
"""

from __future__ import annotations

import threading

import zmq

from eep_hpc import protocol as P
from eep_hpc import signing


class Beacon:
    def __init__(self, ctx: zmq.Context, head_address: str, rank_id: int, every_s: float):
        self.ctx, self.head_address, self.rank_id, self.every_s = ctx, head_address, rank_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rank{rank_id}-beacon", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Before the context is terminated (its socket must be closed first)."""
        self._stop.set()
        self._thread.join(self.every_s + 5)

    def _run(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)  # its own socket: ZMQ sockets are not shared between threads
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 4)  # behind a cut link, a few stale beacons queue, not thousands
        sock.connect(self.head_address)
        try:
            while not self._stop.wait(self.every_s):
                try:
                    sock.send(signing.encode(P.RankAlive(rank_id=self.rank_id)), zmq.NOBLOCK)
                except zmq.Again:  # not connected, or the queue is full: the next beat tries again
                    pass
        finally:
            sock.close(linger=0)
