"""The head's side of its other API processes (serve.api_servers = N > 1): a ROUTER socket each of them connects
a DEALER to (identity `api-<i>`), signed like the rank link.

An API process says ApiHello with the address its ranks' outputs go to, then sends AddRequest (reply_to = its
index) for every request it takes and AbortRequests when one ends early; the head routes and forwards them
(streams.py) and tells it, per request, what only the coordinator knows: move (ApiResend), end (ApiEnd), and
whether the service is ready (ApiReady). Tokens never pass through here: ranks send them to the API process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio

from eep_hpc import protocol as P
from eep_hpc import signing

log = logging.getLogger("eep_hpc.coordinator")

_from_api = msgspec.msgpack.Decoder(P.ApiToHead)


class ApiLink:
    def __init__(self, host: str, count: int):
        self.host, self.count = host, count  # API processes other than the head: indices 1 .. count
        self.address = ""
        self.rank_addresses: dict[int, str] = {}  # api index -> its ApiHello.rank_address
        self._ready: bool | None = None

    def open(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind_to_random_port(f"tcp://{self.host}")
        self.address = self._sock.getsockopt(zmq.LAST_ENDPOINT).decode()

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def send(self, api: int, msg) -> None:
        self._sock.send_multipart([signing.api_identity(api), signing.encode(msg)], flags=zmq.NOBLOCK)

    def send_all(self, msg) -> None:
        for api in self.rank_addresses:
            self.send(api, msg)

    def set_ready(self, ready: bool) -> None:
        """Tell every API process when the service's readiness changes."""
        if ready != self._ready:
            self._ready = ready
            self.send_all(P.ApiReady(ready=ready))

    async def watch_ready(self, ready: Callable[[], bool], period_s: float = 0.1) -> None:
        while True:
            self.set_ready(ready())
            await asyncio.sleep(period_s)

    async def receive(self, on_request: Callable[[P.AddRequest], None],
                      on_abort: Callable[[list[str]], None]) -> None:
        """Until cancelled: hellos recorded, requests and aborts handed on."""
        while True:
            sender, *frames = await self._sock.recv_multipart()
            try:
                if len(frames) != 1:
                    raise signing.BadMessage(f"{len(frames)} frames, not 1")
                msg = signing.decode_as(_from_api, frames[0])
                match msg:
                    case P.ApiHello(api=api, rank_address=address):
                        if sender != signing.api_identity(api):
                            raise signing.BadMessage(f"API process {api} says hello under another identity")
                        self.rank_addresses[api] = address
                        if self._ready is not None:
                            self.send(api, P.ApiReady(ready=self._ready))
                    case P.AddRequest():
                        on_request(msg)
                    case P.AbortRequests(request_ids=ids):
                        on_abort(ids)
            except signing.BadMessage as e:
                signing.log_dropped(log, sender[:64], e)
            except Exception:
                log.exception("bad message from an API process")

    async def wait_for_hellos(self, timeout_s: float) -> list[str]:
        """-> the API processes' rank addresses in index order, once every one said hello."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while len(self.rank_addresses) < self.count:
            if loop.time() > deadline:
                raise TimeoutError(f"{self.count - len(self.rank_addresses)} API process(es) did not start in "
                                   f"{timeout_s:.0f} s")
            await asyncio.sleep(0.05)
        return [self.rank_addresses[i] for i in range(1, self.count + 1)]
