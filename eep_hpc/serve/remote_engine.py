"""The EngineClient of one of the head's other API processes (serve.api_servers > 1).

Requests go to the head (AddRequest with reply_to = this process's index), which picks the rank and forwards them;
the ranks send this process their outputs straight to its PULL socket, so tokens never pass through the head. The
head tells it, per request, what only the coordinator knows: move it (ApiResend: submitted again under a new id
with the tokens so far, as the head re-prefills its own), end it (ApiEnd), and whether the service is ready.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import msgspec
import zmq
import zmq.asyncio

from eep_hpc import protocol as P
from eep_hpc import signing
from eep_hpc.serve.output_queue import OutputQueue, Sink

log = logging.getLogger("eep_hpc.api")

_from_head = msgspec.msgpack.Decoder(P.HeadToApi)


class _Stream:
    __slots__ = ("request_id", "wire_id", "attempt", "queue", "prompt", "sampling", "tokens", "ended_by_head")

    def __init__(self, request_id: str, prompt: list[int], sampling: P.SamplingParams, sink: Sink | None = None):
        self.request_id = self.wire_id = request_id  # wire_id: the id ranks know it by now
        self.attempt = 0
        self.queue = OutputQueue(sink)
        self.prompt, self.sampling = prompt, sampling
        self.tokens: list[int] = []
        self.ended_by_head = False


class RemoteEngine:
    def __init__(self, launch: P.ApiLaunch, tokenizer):
        self.api = launch.api
        self.model_name, self.max_model_len, self.vocab_size = (launch.model_name, launch.max_model_len,
                                                                launch.vocab_size)
        self.tokenizer = tokenizer
        self._launch = launch
        self._ready = False
        self.open: dict[str, _Stream] = {}  # wire id -> stream

    def open_sockets(self) -> None:
        host = self._launch.config.control.host
        self._ctx = zmq.asyncio.Context()
        self._outputs = self._ctx.socket(zmq.PULL)
        self._outputs.setsockopt(zmq.LINGER, 0)
        self._outputs.setsockopt(zmq.RCVHWM, 100_000)
        self._outputs.bind_to_random_port(f"tcp://{host}")
        self._head = self._ctx.socket(zmq.DEALER)
        self._head.setsockopt(zmq.LINGER, 0)
        self._head.setsockopt(zmq.IDENTITY, signing.api_identity(self.api))
        self._head.connect(self._launch.head_address)
        address = self._outputs.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._send(P.ApiHello(api=self.api, rank_address=address))

    def close(self) -> None:
        self._outputs.close(linger=0)
        self._head.close(linger=0)
        self._ctx.term()

    def _send(self, msg) -> None:
        self._head.send(signing.encode(msg), flags=zmq.NOBLOCK)

    async def run(self) -> None:
        """Receive from the ranks and the head until cancelled."""
        await asyncio.gather(self._receive_outputs(), self._receive_from_head())

    async def _receive_outputs(self) -> None:
        while True:
            data = await self._outputs.recv()
            try:
                msg = signing.decode_for_head(data)
            except signing.BadMessage as e:
                signing.log_dropped(log, "a rank", e)
                continue
            if not isinstance(msg, P.StepOutputs):
                continue
            for out in msg.outputs:
                stream = self.open.get(out.request_id)
                if stream is None:  # ended here, or moved (its old id)
                    continue
                if out.new_token_ids:
                    stream.tokens += out.new_token_ids
                stream.queue.put_nowait(out)

    async def _receive_from_head(self) -> None:
        while True:
            data = await self._head.recv()
            try:
                msg = signing.decode_as(_from_head, data)
            except signing.BadMessage as e:
                signing.log_dropped(log, "the head", e)
                continue
            match msg:
                case P.ApiReady(ready=ready):
                    self._ready = ready
                case P.ApiEnd(request_ids=ids, finish_reason=reason, error=error):
                    for wire_id in ids or list(self.open):
                        stream = self.open.get(wire_id)
                        if stream is not None:
                            stream.ended_by_head = True
                            stream.queue.put_nowait(P.RequestOutput(request_id=wire_id, new_token_ids=[],
                                                                    finish_reason=reason, error=error))
                case P.ApiResend(request_ids=ids):
                    for wire_id in ids:
                        self._resend(wire_id)

    def _resend(self, wire_id: str) -> None:
        stream = self.open.pop(wire_id, None)
        if stream is None:  # it finished meanwhile
            return
        stream.attempt += 1
        stream.wire_id = f"{stream.request_id}~{stream.attempt}"
        self.open[stream.wire_id] = stream
        self._send(P.AddRequest(request_id=stream.wire_id, prompt_token_ids=stream.prompt, sampling=stream.sampling,
                                output_token_ids=list(stream.tokens), reply_to=self.api))

    # ---- what the HTTP front calls (serve.engine_client.EngineClient) ---------------------------------------

    def ready(self) -> bool:
        return self._ready

    def cluster_state(self) -> dict:
        return {}  # /admin/* is passed on to the head (api_proxy.py)

    takes_sink = True  # generate(..., sink=): serve.engine_client.EngineClient

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: P.SamplingParams,
                       sink: Sink | None = None) -> AsyncIterator[P.RequestOutput]:
        stream = _Stream(request_id, prompt_token_ids, sampling, sink)
        self.open[request_id] = stream
        self._send(P.AddRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling,
                                reply_to=self.api))
        done_by_rank = False
        try:
            while True:
                out = await stream.queue.get()  # what queued since the last one, merged
                done_by_rank = out.finish_reason is not None and not stream.ended_by_head
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            self.open.pop(stream.wire_id, None)
            if not done_by_rank:  # the rank may still run it; the head forgets it either way
                self._send(P.AbortRequests(request_ids=[stream.wire_id]))
