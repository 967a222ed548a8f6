"""A rank's step trace: with engine.step_trace = DIR, each rank appends one JSON line per step to
DIR/rank-<id>.jsonl (when it began, how long it took, the plan, what ran, what waits) and one per batch of new
requests it received. For finding where latency goes (a burst's first tokens, a stall) without a profiler; off by
default, and a no-op then. With EEP_HPC_PROFILE_STEPS=N as well, the first N steps that run a batch run under
cProfile, and DIR/rank-<id>-profile.txt gets the functions by cumulative time (the host's view: a step waits for
the GPU when it samples). Every Triton kernel compiled in the process gets a line too ("jit": which kernel, with
its specialisation), so a compile in the middle of serving shows by its time."""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import pstats
import time


class StepTrace:
    def __init__(self, directory: str, rank_id: int):
        self.file = None
        self.profile_left = 0
        if directory:
            os.makedirs(directory, exist_ok=True)
            self.file = open(os.path.join(directory, f"rank-{rank_id}.jsonl"), "a", buffering=1)
            self.profile_left = int(os.environ.get("EEP_HPC_PROFILE_STEPS", "0"))
            self.profile_path = os.path.join(directory, f"rank-{rank_id}-profile.txt")
            self.profiler = cProfile.Profile() if self.profile_left else None
            self.watch_jit()

    def watch_jit(self) -> None:
        try:
            from triton import knobs
        except ImportError:  # no Triton (a CPU-only install): nothing is compiled
            return

        def compiled(*, key, repr: str, **_) -> None:  # key: the argument types and alignments it was built for
            self.write(event="jit", kernel=repr.split("[", 1)[0], key=str(key)[:1000])

        knobs.runtime.jit_post_compile_hook = compiled

    def __bool__(self) -> bool:
        return self.file is not None

    def write(self, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"t": round(time.time(), 6), **fields}) + "\n")

    @contextlib.contextmanager
    def profiled(self, busy: bool):
        """Profile the step inside (while steps with a batch remain to profile); the report is rewritten after each."""
        if not (busy and self.profile_left > 0):
            yield
            return
        self.profiler.enable()
        try:
            yield
        finally:
            self.profiler.disable()
            self.profile_left -= 1
            text = io.StringIO()
            pstats.Stats(self.profiler, stream=text).sort_stats("cumulative").print_stats(80)
            with open(self.profile_path, "w") as f:
                f.write(text.getvalue())

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
