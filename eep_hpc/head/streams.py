"""Open requests as the head sees them: each a queue of outputs for its HTTP stream and the rank that runs it.

A request goes to the least-loaded READY member (requests in flight, then KV use). A request that arrives while the
ranks are idle starts a wave (Wake to every member, since each MoE layer needs all of them); epoch rank 0 reports
WaveDone when all ran out of work, and a new wave starts if requests are still out. When a request must move (its
rank drains or is lost) it starts again elsewhere from its prompt and the tokens it has so far (re-prefill), so the
client's stream continues.

With serve.api_servers > 1, requests of the head's other API processes are here too (api_link.py): routed, woken
and moved the same way, but their tokens go from the ranks straight to their API process; the head keeps only
which rank runs each (a rank tells it when one finishes), and asks the API process to submit a moved one again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from eep_hpc import protocol as P
from eep_hpc.head.events import ScaleEvent, ScalePhase
from eep_hpc.head.link import RankLink
from eep_hpc.head.membership import Membership, RankRecord, RankState
from eep_hpc.serve.output_queue import OutputQueue, Sink


@dataclass
class Stream:
    queue: OutputQueue | None  # None: streamed by another API process (`api`), which holds its tokens
    rank_id: int
    prompt_token_ids: list[int]
    sampling: P.SamplingParams
    output_token_ids: list[int] = field(default_factory=list)
    last_token_at: float = field(default_factory=time.monotonic)
    watch_gap: bool = False  # measure its next inter-token gap (around a commit)
    api: int = 0



class Streams:
    def __init__(self, membership: Membership, link: RankLink, recovery_wait_s: float):
        self.membership, self.link, self.recovery_wait_s = membership, link, recovery_wait_s
        self.to_api: Callable[[int, object], None] | None = None  # send to API process i (api_link.py), if any
        self._parked: dict[str, asyncio.Task] = {}  # other API processes' requests waiting for a recovery, by id
        self.open: dict[str, Stream] = {}  # request id -> stream
        self.wave = 0
        self.wave_running = False
        self._gaps_of: ScaleEvent | None = None  # the event whose commit pause the next tokens measure

    def __iter__(self):
        """The open requests' ids."""
        return iter(self.open)

    def __len__(self) -> int:
        return len(self.open)

    # ---- one request ----------------------------------------------------------------------------------------

    def route(self) -> RankRecord:
        ready = self.membership.ready()
        if not ready:
            raise RuntimeError("no rank is ready to serve")

        def load(rec: RankRecord):
            total = rec.stats.kv_blocks_total or 1
            return (len(rec.in_flight), rec.stats.kv_blocks_used / total, rec.rank_id)

        return min(ready, key=load)

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: P.SamplingParams,
                       sink: Sink | None = None) -> AsyncIterator[P.RequestOutput]:
        m = self.membership
        if m.recovering:  # members were lost: the survivors are re-forming, then take it
            await m.wait_for(lambda: not m.recovering, self.recovery_wait_s, "the serving group to recover",
                             raise_on_failed=False)
        rec = self.route()
        stream = Stream(OutputQueue(sink), rec.rank_id, prompt_token_ids, sampling)
        self.open[request_id] = stream
        rec.in_flight.add(request_id)
        self.link.send(rec.rank_id, P.AddRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                                 sampling=sampling))
        self.start_wave()
        finished = False
        try:
            while True:
                out = await stream.queue.get()  # what queued since the last one, merged
                finished = out.finish_reason is not None
                yield out
                if finished:
                    return
        finally:
            self.open.pop(request_id, None)
            owner = m.ranks.get(stream.rank_id)
            if owner is not None:
                owner.in_flight.discard(request_id)
                if not finished and owner.state in (RankState.READY, RankState.DRAINING):
                    self.link.send(owner.rank_id, P.AbortRequests(request_ids=[request_id]))

    def submit(self, msg: P.AddRequest) -> None:
        """A request of another API process (msg.reply_to): routed as generate() routes, forwarded as it came."""
        m = self.membership
        if m.recovering:
            task = asyncio.get_running_loop().create_task(self._submit_after_recovery(msg))
            self._parked[msg.request_id] = task
            task.add_done_callback(lambda t: self._parked.pop(msg.request_id, None)
                                   if self._parked.get(msg.request_id) is t else None)
            return
        try:
            rec = self.route()
        except RuntimeError as e:
            self.to_api(msg.reply_to, P.ApiEnd(request_ids=[msg.request_id], finish_reason="error", error=str(e)))
            return
        self.open[msg.request_id] = Stream(None, rec.rank_id, [], msg.sampling, api=msg.reply_to)
        rec.in_flight.add(msg.request_id)
        self.link.send(rec.rank_id, msg)
        self.start_wave()

    async def _submit_after_recovery(self, msg: P.AddRequest) -> None:
        m = self.membership
        try:
            await m.wait_for(lambda: not m.recovering, self.recovery_wait_s, "the serving group to recover",
                             raise_on_failed=False)
        except Exception as e:  # what generate() raises to the head's own requests, as an end for this one
            self.to_api(msg.reply_to, P.ApiEnd(request_ids=[msg.request_id], finish_reason="error", error=str(e)))
            return
        self.submit(msg)

    def cancel(self, request_ids: list[str]) -> None:
        """Another API process ended these early (client gone, stop string, or an ApiEnd)."""
        for rid in request_ids:
            parked = self._parked.pop(rid, None)
            if parked is not None:  # ended before the recovery let it reach a rank
                parked.cancel()
            stream = self.open.get(rid)
            if stream is None or stream.queue is not None:
                continue
            self._forget(rid, stream)
            owner = self.membership.ranks.get(stream.rank_id)
            if owner is not None and owner.state in (RankState.READY, RankState.DRAINING):
                self.link.send(owner.rank_id, P.AbortRequests(request_ids=[rid]))

    def drop_api(self, api: int) -> int:
        """API process `api` is gone (its clients' connections with it): abort its requests -> how many."""
        ids = [rid for rid, stream in self.open.items() if stream.queue is None and stream.api == api]
        self.cancel(ids)
        return len(ids)

    def _forget(self, rid: str, stream: Stream) -> None:
        del self.open[rid]
        owner = self.membership.ranks.get(stream.rank_id)
        if owner is not None:
            owner.in_flight.discard(rid)

    async def abort(self, request_id: str) -> None:
        stream = self.open.get(request_id)
        if stream is not None:
            self.link.send(stream.rank_id, P.AbortRequests(request_ids=[request_id]))
            stream.queue.put_nowait(P.RequestOutput(request_id=request_id, new_token_ids=[], finish_reason="abort"))

    def take(self, rank_id: int, outputs: list[P.RequestOutput]) -> None:
        """Outputs a rank produced (StepOutputs) to their streams."""
        now = time.monotonic()
        for out in outputs:
            stream = self.open.get(out.request_id)
            if stream is None or stream.rank_id != rank_id:  # finished, or moved to another rank
                continue
            if stream.queue is None:  # another API process's: the rank says only that it finished
                if out.finish_reason is not None:
                    self._forget(out.request_id, stream)
                continue
            if out.new_token_ids:
                self._note_token(stream, now)
                stream.output_token_ids += out.new_token_ids
            stream.queue.put_nowait(out)

    def end_all(self, finish_reason: P.FinishReason, error: str) -> None:
        remote: dict[int, list[str]] = {}
        for rid, stream in self.open.items():
            if stream.queue is None:
                remote.setdefault(stream.api, []).append(rid)
                continue
            stream.queue.put_nowait(P.RequestOutput(request_id="", new_token_ids=[], finish_reason=finish_reason,
                                                    error=error))
        self._end_remote(remote, finish_reason, error)

    def _end_remote(self, ids_by_api: dict[int, list[str]], finish_reason: P.FinishReason, error: str) -> None:
        """The API processes end these and abort them back (cancel), which forgets them here."""
        for api, ids in ids_by_api.items():
            self.to_api(api, P.ApiEnd(request_ids=ids, finish_reason=finish_reason, error=error))

    def fail_on(self, rec: RankRecord, why: str) -> None:
        """A rank that is not a member failed: its requests end with an error (nobody else runs them)."""
        remote: dict[int, list[str]] = {}
        for rid in list(rec.in_flight):
            stream = self.open.get(rid)
            if stream is not None and stream.queue is None:
                remote.setdefault(stream.api, []).append(rid)
            elif stream is not None:
                stream.queue.put_nowait(P.RequestOutput(request_id=rid, new_token_ids=[], finish_reason="error",
                                                        error=f"rank {rec.rank_id} failed: {why}"))
        rec.in_flight.clear()
        self._end_remote(remote, "error", f"rank {rec.rank_id} failed: {why}")

    # ---- waves ----------------------------------------------------------------------------------------------

    def start_wave(self) -> None:
        if self.wave_running:
            return
        self.wave_running = True
        for rid in self.membership.members:
            self.link.send(rid, P.Wake(wave=self.wave))

    def wave_done(self, wave: int) -> None:
        if wave == self.wave:
            self.wave, self.wave_running = wave + 1, False
            if self.open:
                self.start_wave()

    def commit_wave(self) -> int:
        """The wave members step in after a commit (CommitEpoch.wave); it runs from the commit on."""
        self.wave += 1
        self.wave_running = True
        return self.wave

    # ---- moving requests ------------------------------------------------------------------------------------

    def migrate_from(self, rank_id: int, survivors: list[int]) -> int:
        """Move every request of `rank_id` to the least-loaded survivor -> how many moved."""
        rec = self.membership.ranks[rank_id]
        if not rec.in_flight:
            return 0
        self.link.send(rank_id, P.AbortRequests(request_ids=list(rec.in_flight)))
        moved, resend = 0, {}
        for rid in list(rec.in_flight):
            stream = self.open.get(rid)
            rec.in_flight.discard(rid)
            if stream is None:
                continue
            self._restart_on(rid, stream, survivors, resend)
            moved += 1
        self._resend(resend)
        self.start_wave()
        return moved

    def restart_all(self, members: list[int]) -> int:
        """Every open stream to the least-loaded member (after a recovery, survivors hold none) -> how many."""
        for rec in self.membership.ranks.values():
            rec.in_flight.clear()
        moved, resend = len(self.open), {}
        for rid, stream in list(self.open.items()):
            self._restart_on(rid, stream, members, resend)
        self._resend(resend)
        self.start_wave()
        return moved

    def _restart_on(self, rid: str, stream: Stream, members: list[int], resend: dict[int, list[str]]) -> None:
        """Re-send a stream (prompt + tokens so far: re-prefill) to the least-loaded READY rank of `members`; one
        of another API process is forgotten here and goes into `resend` for that process to submit again."""
        if stream.queue is None:
            self.open.pop(rid, None)
            resend.setdefault(stream.api, []).append(rid)
            return
        ranks = self.membership.ranks
        target = min((ranks[r] for r in members if ranks[r].state == RankState.READY),
                     key=lambda r: (len(r.in_flight), r.rank_id))
        stream.rank_id = target.rank_id
        target.in_flight.add(rid)
        self.link.send(target.rank_id, P.AddRequest(request_id=rid, prompt_token_ids=stream.prompt_token_ids,
                                                    sampling=stream.sampling,
                                                    output_token_ids=list(stream.output_token_ids)))

    def _resend(self, ids_by_api: dict[int, list[str]]) -> None:
        for api, ids in ids_by_api.items():
            self.to_api(api, P.ApiResend(request_ids=ids))

    # ---- the commit pause -----------------------------------------------------------------------------------

    def watch_gaps(self, event: ScaleEvent) -> None:
        """Measure every stream's next inter-token gap into event.commit_pause_ms (a commit is under way)."""
        self._gaps_of = event
        for stream in self.open.values():
            stream.watch_gap = True

    def stop_watching(self) -> None:
        self._gaps_of = None
        for stream in self.open.values():
            stream.watch_gap = False

    def _note_token(self, stream: Stream, now: float) -> None:
        event = self._gaps_of
        if stream.watch_gap and event is not None:
            gap_ms = (now - stream.last_token_at) * 1000
            event.commit_pause_ms = max(event.commit_pause_ms, gap_ms)
            if event.phase != ScalePhase.COMMITTING:
                stream.watch_gap = False
        stream.last_token_at = now
