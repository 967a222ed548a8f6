"""When each streamed token left this API process: for the head benchmark (serve.write_log), which subtracts the
stand-in ranks' emit times (standin.emit_log) to get the delay the head adds, apart from what its clients add.

Each finished stream appends one line to FOLDER/api-<pid>.jsonl: `["<engine request id>", [t0, t1, ...]]`, the
time.time() at which the chunk carrying each completion token had been handed to the socket (several tokens merged
into one chunk share its time).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import msgspec


class WriteLog:
    def __init__(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self._fd = os.open(Path(folder) / f"api-{os.getpid()}.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def stream(self, request_id: str, num_choices: int) -> "StreamWrites":
        return StreamWrites(self, request_id, num_choices)

    def write(self, request_id: str, times: list[float]) -> None:
        os.write(self._fd, msgspec.json.encode([request_id, times]) + b"\n")


class StreamWrites:
    """One response's write times, per choice."""

    __slots__ = ("log", "request_id", "times")

    def __init__(self, log: WriteLog, request_id: str, num_choices: int) -> None:
        self.log, self.request_id = log, request_id
        self.times: list[list[float]] = [[] for _ in range(num_choices)]

    def written(self, index: int, num_tokens: int) -> None:
        """The chunk that brought choice `index` to `num_tokens` completion tokens was just sent."""
        times = self.times[index]
        if num_tokens > len(times):
            times += [time.time()] * (num_tokens - len(times))

    def close(self) -> None:
        for k, times in enumerate(self.times):
            self.log.write(f"{self.request_id}-{k}", times)
