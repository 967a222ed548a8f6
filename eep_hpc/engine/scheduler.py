"""Which sequences compute which tokens this step (vLLM-v1-style unified scheduling).

Every scheduled sequence computes `num_new_tokens` tokens from `seq.num_computed_tokens` on: 1 for a decode, a chunk
of the prompt for a prefill (cut where the step's token budget runs out), so prefills and decodes share one batch.
A sequence whose chunk reaches its last token gets a token sampled; a mid-prefill one does not.

Queues: `waiting` (FIFO, no KV blocks) and `running` (holds blocks, in admission order). When the cache is full,
the last running sequence is preempted by recompute: its blocks are freed, it keeps its output tokens and goes to
the front of `waiting`, so it resumes first. Waiting sequences are admitted strictly in order (none overtakes one
that did not fit), and the first running sequence is never preempted for another one, so every sequence finishes:
its length is capped by the cache (see `_stop_reason`) as well as by max_model_len.

Prefix caching (BlockManager): a waiting sequence is admitted with the KV of its longest cached prefix of full
blocks (num_computed_tokens starts there, always short of its last token); blocks whose KV a step completed are
registered in postprocess. Preemption and abort free blocks by ref count, so shared blocks stay with the others.

Caller loop: `out = schedule()`, run the model on `out.scheduled`, `postprocess(out, sampled)`; call postprocess for
every output that is not `is_empty` (it also reports sequences the scheduler finished without running them).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from eep_hpc.config import EngineConfig
from eep_hpc.engine.block_manager import BlockManager
from eep_hpc.engine.sequence import Sequence, SequenceStatus
from eep_hpc.protocol import FinishReason, Logprobs, RequestOutput


class ScheduledSeq(NamedTuple):
    seq: Sequence
    num_new_tokens: int

    @property
    def needs_sample(self) -> bool:
        """True when this chunk reaches the sequence's last token (valid until postprocess advances it)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


class SchedulerOutput:
    def __init__(self) -> None:
        self.scheduled: list[ScheduledSeq] = []
        self.num_batched_tokens = 0
        self.preempted: list[Sequence] = []  # moved back to waiting this step; not in `scheduled`
        self.finished: list[RequestOutput] = []  # finished without running (can never fit in the cache)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.finished

    def __repr__(self) -> str:
        chunks = ", ".join(f"{s.seq.request_id}:{s.num_new_tokens}" for s in self.scheduled)
        return f"SchedulerOutput([{chunks}], tokens={self.num_batched_tokens}, preempted={len(self.preempted)})"


class Scheduler:
    def __init__(
        self, cfg: EngineConfig, block_manager: BlockManager, max_model_len: int, eos_token_ids: list[int]
    ) -> None:
        self.max_num_seqs = cfg.max_num_seqs
        self.max_num_batched_tokens = cfg.max_num_batched_tokens
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._live: dict[str, Sequence] = {}  # waiting + running, by request id
        self.num_preemptions = 0  # since start, for stats

    # ---- queues ---------------------------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._live:
            raise ValueError(f"request {seq.request_id!r} is already on this rank")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._live[seq.request_id] = seq

    def abort(self, request_ids: list[str]) -> list[Sequence]:
        aborted = []
        for request_id in request_ids:
            seq = self._live.get(request_id)
            if seq is None:
                continue
            (self.waiting if seq.status is SequenceStatus.WAITING else self.running).remove(seq)
            self._finish(seq, "abort")
            aborted.append(seq)
        return aborted

    def get(self, request_id: str) -> Sequence | None:
        return self._live.get(request_id)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ---- one step -------------------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._grow_or_preempt(seq, seq.num_computed_tokens + num_new, out):
                break  # seq preempted itself: it was the last running one
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1

        # No admissions in a step that had to preempt: the cache is full.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            if seq.num_tokens > self.block_manager.capacity_tokens:
                self.waiting.popleft()
                out.finished.append(self._reject(seq))
                continue
            # Cached prefix blocks are reused, except by a sequence that needs logits at every prompt position.
            lookup = not seq.wants_prompt_logprobs
            prefix = self.block_manager.cached_prefix(seq) if lookup else []
            num_cached = len(prefix) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.allocate(seq, num_cached + num_new, prefix):
                break  # later ones wait behind it
            if lookup:
                self.block_manager.note_admitted(seq, num_cached)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

        out.num_batched_tokens = self.max_num_batched_tokens - budget
        return out

    def postprocess(
        self, out: SchedulerOutput, sampled: list[int | None], logprobs: list[Logprobs | None] | None = None
    ) -> list[RequestOutput]:
        """Advance the scheduled sequences by the step's results; sampled[i] (and logprobs[i], the sampled token's
        logprobs when its request asked for them) belong to out.scheduled[i]."""
        if len(sampled) != len(out.scheduled):
            raise ValueError(f"{len(sampled)} sampled tokens for {len(out.scheduled)} scheduled sequences")
        logprobs = logprobs or [None] * len(sampled)
        outputs = list(out.finished)
        for (seq, num_new), token, lp in zip(out.scheduled, sampled, logprobs):
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted since schedule()
            seq.num_computed_tokens += num_new
            self.block_manager.cache_computed_blocks(seq)
            if seq.num_computed_tokens < seq.num_tokens:
                continue  # mid-prefill: nothing sampled
            if token is None:
                raise ValueError(f"{seq.request_id}: reached its last token but no token was sampled")
            seq.output_token_ids.append(token)
            reason = self._stop_reason(seq, token)
            if reason is not None:
                self.running.remove(seq)
                self._finish(seq, reason)
            prompt_lp, seq.prompt_logprobs = seq.prompt_logprobs, None  # sent once, with the first output
            outputs.append(RequestOutput(request_id=seq.request_id, new_token_ids=[token], finish_reason=reason,
                                         logprobs=lp, prompt_logprobs=prompt_lp))
        return outputs

    # ---- transitions ----------------------------------------------------------------------------------------

    def _grow_or_preempt(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> bool:
        """Give seq blocks for num_tokens, preempting from the end of `running`; False if seq itself went."""
        while not self.block_manager.allocate(seq, num_tokens):
            victim = self.running.pop()
            self._preempt(victim)
            out.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._live[seq.request_id]

    def _reject(self, seq: Sequence) -> RequestOutput:
        capacity = self.block_manager.capacity_tokens
        if seq.num_prompt_tokens > capacity:
            reason: FinishReason = "error"
            error = f"prompt of {seq.num_prompt_tokens} tokens does not fit in the KV cache ({capacity} tokens)"
        else:  # migrated with more output than this rank's cache holds: its context is full
            reason, error = "length", ""
        self._finish(seq, reason)
        return RequestOutput(request_id=seq.request_id, new_token_ids=[], finish_reason=reason, error=error)

    def _stop_reason(self, seq: Sequence, token: int) -> FinishReason | None:
        sp = seq.sampling
        if seq.num_output_tokens >= sp.min_tokens:
            if token in sp.stop_token_ids or (token in self.eos_token_ids and not sp.ignore_eos):
                return "stop"
        # The next step computes all num_tokens tokens: past the cache's capacity that can never fit.
        if (
            seq.num_output_tokens >= sp.max_tokens
            or seq.num_tokens >= self.max_model_len
            or seq.num_tokens > self.block_manager.capacity_tokens
        ):
            return "length"
        return None
