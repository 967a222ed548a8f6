"""A rank's step trace: with engine.step_trace = DIR, each rank appends one JSON line per step to
DIR/rank-<id>.jsonl (when it began, how long it took, the plan, what ran, what waits) and one per batch of new
requests it received. For finding where latency goes (a burst's first tokens, a stall) without a profiler; off by
default, and a no-op then."""

from __future__ import annotations

import json
import os
import time


class StepTrace:
    def __init__(self, directory: str, rank_id: int):
        self.file = None
        if directory:
            os.makedirs(directory, exist_ok=True)
            self.file = open(os.path.join(directory, f"rank-{rank_id}.jsonl"), "a", buffering=1)

    def __bool__(self) -> bool:
        return self.file is not None

    def write(self, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"t": round(time.time(), 6), **fields}) + "\n")

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
