"""A stand-in for RankEngine with no model: each step gives every running request its next token, at a set rate.

It has RankEngine's interface as the rank process uses it (add, abort, abort_all, demand, step, stats, ...), so a
rank running it is the real rank: the same socket loop, signing, registration, epoch group (gloo, for real), step
agreement, waves and heartbeats. Only the model is gone, which lets one CPU machine load the head the way N GPUs
would (`eep-hpc bench-head`).

- A step takes 1 / steps_per_s seconds of wall time (sleeping, as a rank waits on its GPU) and advances up to
  engine.max_num_seqs requests by one token each; waiting requests join the batch as it frees, first come first.
- Token k of a request's output is its prompt's token k mod the prompt's length: ids the head accepted, the text
  predictable. A request finishes with "length" at max_tokens (or at the context's end); EOS and stop token ids
  are never produced, logprobs are never computed.
- With standin.emit_log set, each finished request's emit times (time.time() when its step's outputs were made)
  go to RUN/rank-<id>.jsonl as `["<request id>", [t0, t1, ...]]`: the benchmark subtracts them from the times its
  clients received each token, which is the delay the head adds.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

import msgspec

from eep_hpc.config import Config
from eep_hpc.parallel.step_plan import GraphSizes, StepDemand, StepPlan
from eep_hpc.protocol import AddRequest, RankStats, RequestOutput


class StandinRequest:
    __slots__ = ("request_id", "prompt", "produced", "limit", "emitted_at")

    def __init__(self, msg: AddRequest, max_model_len: int):
        self.request_id = msg.request_id
        self.prompt = msg.prompt_token_ids or [0]
        self.produced = len(msg.output_token_ids)  # a moved request continues where it was
        room = max_model_len - len(msg.prompt_token_ids) if max_model_len else msg.sampling.max_tokens
        self.limit = max(1, min(msg.sampling.max_tokens, room))
        self.emitted_at: list[float] = []


class StandinEngine:
    def __init__(self, cfg: Config, rank_id: int, max_model_len: int):
        self.max_model_len = max_model_len
        self.max_batch = cfg.engine.max_num_seqs
        self.step_s = 1.0 / cfg.standin.steps_per_s
        self.ep = None  # no experts, no all-to-all
        self.chunk_tokens = 0
        self.steps = 0
        self.waiting: deque[StandinRequest] = deque()
        self.running: dict[str, StandinRequest] = {}
        self._due = 0.0  # monotonic time the next step may run
        self._log_fd = -1
        if cfg.standin.emit_log:
            folder = Path(cfg.standin.emit_log)
            folder.mkdir(parents=True, exist_ok=True)
            self._log_fd = os.open(folder / f"rank-{rank_id}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    # ---- requests -------------------------------------------------------------------------------------------

    def add(self, msg: AddRequest) -> None:
        self.waiting.append(StandinRequest(msg, self.max_model_len))

    def abort(self, request_ids: list[str]) -> None:
        ids = set(request_ids)
        for rid in ids:
            self.running.pop(rid, None)
        if any(r.request_id in ids for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if r.request_id not in ids)

    def abort_all(self) -> int:
        n = len(self.running) + len(self.waiting)
        self.running.clear()
        self.waiting.clear()
        return n

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- steps ----------------------------------------------------------------------------------------------

    def demand(self) -> StepDemand:
        if not self.has_work():
            return StepDemand(graphable=True)
        seqs = min(self.max_batch, len(self.running) + len(self.waiting))
        return StepDemand(tokens=seqs, seqs=seqs, graphable=True, busy=True)

    def graph_sizes(self) -> GraphSizes:
        return GraphSizes()

    def skip_step(self) -> list[RequestOutput]:
        """Nothing scheduled anywhere: nothing to forget (a stand-in schedules inside `step`)."""
        return []

    def step(self, plan: StepPlan | None = None) -> list[RequestOutput]:
        """Wait out the step's time, then one token for each request of the batch."""
        wait = self._due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        now = time.monotonic()
        # on schedule, or late by under a step: keep the grid; later (e.g. the first step after idling): from now
        self._due = (self._due if now - self._due < self.step_s else now) + self.step_s
        self.steps += 1
        while self.waiting and len(self.running) < self.max_batch:
            r = self.waiting.popleft()
            self.running[r.request_id] = r
        now = time.time()
        outputs = []
        finished = []
        for r in self.running.values():
            token = r.prompt[r.produced % len(r.prompt)]
            r.produced += 1
            done = r.produced >= r.limit
            outputs.append(RequestOutput(request_id=r.request_id, new_token_ids=[token],
                                         finish_reason="length" if done else None))
            if self._log_fd >= 0:
                r.emitted_at.append(now)
            if done:
                finished.append(r)
        for r in finished:
            del self.running[r.request_id]
            if self._log_fd >= 0:
                os.write(self._log_fd, msgspec.json.encode([r.request_id, r.emitted_at]) + b"\n")
        return outputs

    def stats(self, with_load: bool = False) -> RankStats:
        """Sequence slots stand for KV blocks (the head routes by their use)."""
        return RankStats(num_running=len(self.running), num_waiting=len(self.waiting),
                         kv_blocks_used=len(self.running), kv_blocks_total=self.max_batch, steps=self.steps)


def build_standin(launch) -> StandinEngine:
    """The stand-in of a rank of `launch`: its context length is the model's (config.json), nothing is loaded."""
    from eep_hpc.engine.rank_engine import max_model_len
    from eep_hpc.model.arch import load_arch

    time.sleep(launch.config.standin.startup_s)  # deaf to the head meanwhile, as a loading GPU rank is
    return StandinEngine(launch.config, launch.rank_id, max_model_len(launch.config, load_arch(launch.model_dir)))
