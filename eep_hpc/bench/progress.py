"""The bench's progress on stderr: a tqdm bar on a terminal (requests done, failed, in flight), a line every few
seconds otherwise (a Slurm job's output gets no carriage returns)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, stream=None, every_s: float = 5.0) -> None:
        self.total, self.done, self.failed, self.in_flight = total, 0, 0, 0
        self.stream = stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every_s = every_s
        self.start = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc="bench", unit="req", file=self.stream, dynamic_ncols=True) if self.tty else None

    def started(self) -> None:
        self.in_flight += 1
        self.show()

    def finished(self, ok: bool) -> None:
        self.in_flight -= 1
        self.done += 1
        self.failed += not ok
        if self.bar is not None:
            if self.bar.total is not None and self.done > self.bar.total:
                self.bar.total = None  # the scale plan keeps the load going past --num-prompts: a count, no bar
            self.bar.update(1)
        self.show()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        done = f"{self.done}/{self.total}"
        if self.done > self.total:
            done = f"{self.done} ({self.total} + more while the scale plan runs)"
        return f"bench: {done} done, {self.failed} failed, {self.in_flight} in flight, {elapsed:.1f} s"

    def show(self, force: bool = False) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.failed} failed, {self.in_flight} in flight", refresh=force)
            return
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        self.stream.write(self.line() + "\n")
        self.stream.flush()

    def note(self, text: str) -> None:
        """A line of its own (a scale event), above the bar on a terminal."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            self.show(force=True)
