"""Python's garbage collector in the head and its API processes, which pass on every streamed token.

A collection of the oldest generation walks every tracked object: after start-up that is the imported modules,
torch, the app and the tokenizer (with the tiny model: 221k objects in the head, 72k in a second API process), and
such a collection stopped the API path for 60-90 ms (python -m eep_hpc.bench.serve_path, 512 streams) while every
stream waited for its next token. Once a process is up, `freeze_startup_heap` moves what is alive into the permanent
generation, so later collections walk only what requests keep alive (vLLM's freeze_gc_heap and SGLang's freeze_gc do
the same). It also lets the youngest generation grow to 10,000 objects before a collection (Python's default is
700): a burst of 512 streams' tokens allocates that many short-lived objects, most of them freed by their reference
counts, and collecting every 700 promoted the rest early into the generations whose collections are long. Measured
with `python -m eep_hpc.bench.serve_path` (512 streams, 2 shared cores): a token's chunk reached `send` within p99
12-13 ms of its step frozen, 96-97 ms not (results/README.md). EEP_HPC_GC_FREEZE=0 leaves the collector as Python
sets it (a benchmark's "before"). `warn_on_long_pauses` logs each collection that still stops the process longer
than a threshold.
"""

from __future__ import annotations

import gc
import logging
import os
import time

log = logging.getLogger(__name__)

LONG_PAUSE_S = 0.05
YOUNGEST_THRESHOLD = 10_000
_watching = False  # the process's watch is installed (once)


def freeze_startup_heap(who: str) -> int:
    """Collect once, then leave every object alive now out of later collections -> how many objects are frozen."""
    if os.environ.get("EEP_HPC_GC_FREEZE", "1") == "0":
        return 0
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNGEST_THRESHOLD, older, oldest)
    frozen = gc.get_freeze_count()
    log.info("%s: %d start-up objects frozen out of the garbage collector's walks", who, frozen)
    return frozen


def warn_on_long_pauses(who: str, threshold_s: float = LONG_PAUSE_S) -> None:
    """Log a warning for every collection that takes longer than threshold_s (once per process)."""
    global _watching
    if not _watching:
        _watching = True
        gc.callbacks.append(_Watch(who, threshold_s))


class _Watch:
    def __init__(self, who: str, threshold_s: float) -> None:
        self.who, self.threshold_s, self.started = who, threshold_s, 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        took = time.perf_counter() - self.started
        if took > self.threshold_s:
            log.warning("%s: a garbage collection of generation %d stopped this process for %.0f ms (%d collected)",
                        self.who, info["generation"], took * 1e3, info["collected"])
