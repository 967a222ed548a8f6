"""Shared fixtures: a real head (coordinator + HTTP API) with real rank processes serving the tiny model."""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from eep_hpc.config import load_config


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # one tiny checkpoint per test session, shared with rank processes through the environment
    os.environ.setdefault("EEP_HPC_CACHE", str(tmp_path_factory.mktemp("eep-cache")))


@dataclass
class RunningHead:
    head: object
    url: str
    model: str
    tokenizer: object
    thread: threading.Thread
    loop: asyncio.AbstractEventLoop
    errors: list = field(default_factory=list)

    def state(self) -> dict:
        r = httpx.get(f"{self.url}/admin/state", timeout=10)
        r.raise_for_status()
        return r.json()

    def call(self, coro, timeout: float = 300):
        """Run a coroutine on the head's event loop (admin actions in tests)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.head.request_stop)
        self.thread.join(60)
        assert not self.thread.is_alive(), "head did not stop"


def start_head(run_dir: Path, ranks: int = 1, **overrides) -> RunningHead:
    """Start a head in a background thread (its own event loop) and wait until it serves."""
    from eep_hpc.head.main import Head

    sections = {"serve": {"port": 0}, "parallel": {"ranks": ranks, "device": "cpu"}, "control": {"run_dir": str(run_dir)}}
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    cfg = load_config(None, **sections)
    ready = threading.Event()
    box: dict = {}

    def main():
        loop = asyncio.new_event_loop()
        box["loop"] = loop
        head = Head(cfg)
        box["head"] = head
        try:
            loop.run_until_complete(head.run(on_ready=lambda h: ready.set()))
        except BaseException as e:  # surfaced to the test below
            box["error"] = e
            ready.set()
        finally:
            loop.close()

    thread = threading.Thread(target=main, name="head", daemon=True)
    thread.start()
    ready.wait(300)
    if "error" in box or not ready.is_set():
        raise RuntimeError(f"head failed to start: {box.get('error')!r}")
    head = box["head"]
    return RunningHead(head, head.url, head.coordinator.model_name, head.coordinator.tokenizer, thread, box["loop"])


@pytest.fixture(scope="session")
def api(tmp_path_factory):
    running = start_head(tmp_path_factory.mktemp("run"), ranks=1)
    yield running
    running.stop()


def greedy(engine, prompts: list[list[int]], n: int = 24) -> list[list[int]]:
    """Greedy token ids of each prompt, run to n tokens on an in-process RankEngine."""
    from eep_hpc import protocol as P

    sampling = P.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add(P.AddRequest(request_id=str(i), prompt_token_ids=p, sampling=sampling))
    out = {str(i): [] for i in range(len(prompts))}
    while engine.has_work():
        for o in engine.step():
            out[o.request_id] += o.new_token_ids
    return [out[str(i)] for i in range(len(prompts))]
