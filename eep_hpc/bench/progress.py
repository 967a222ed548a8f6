"""The progress line on stderr: rewritten in place on a terminal, a line every few seconds otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, stream=None, every_s: float = 5.0) -> None:
        self.total, self.done, self.failed, self.in_flight = total, 0, 0, 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if not self.tty else 0.1
        self.start = self.last = time.perf_counter()

    def started(self) -> None:
        self.in_flight += 1
        self.show()

    def finished(self, ok: bool) -> None:
        self.in_flight -= 1
        self.done += 1
        self.failed += not ok
        self.show()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        done = f"{self.done}/{self.total}"
        if self.done > self.total:
            done = f"{self.done} ({self.total} + more while the scale plan runs)"
        return f"bench: {done} done, {self.failed} failed, {self.in_flight} in flight, {elapsed:.1f} s"

    def show(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last < self.every_s:
            return
        self.last = now
        if self.tty:
            self.stream.write("\r\033[K" + self.line())
        else:
            self.stream.write(self.line() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.show(force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
