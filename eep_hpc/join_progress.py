"""`eep-hpc grow` while it waits: where each joining rank is (queued in Slurm, submitted, connected, staging in the
event's prepare, committing, ready), read from GET /admin/state twice a second while the grow request runs. A tqdm
bar with the ranks' states on a terminal; otherwise a line each time something changed."""

from __future__ import annotations

import asyncio
import sys

import httpx
from tqdm import tqdm

POLL_S = 0.5

_WORDS = {"PENDING": "queued", "LAUNCHED": "submitted", "CONNECTED": "connected", "READY": "ready",
          "DRAINING": "draining"}


def rank_phase(rank: dict, scaling: dict | None) -> str:
    if scaling and rank["rank_id"] in scaling.get("joined", []) and rank["state"] != "READY":
        return "staging" if scaling["phase"] == "PREPARING" else scaling["phase"].lower()
    return _WORDS.get(rank["state"], rank["state"].lower())


def describe(state: dict, joining: list[int]) -> tuple[int, str]:
    """(ranks ready, one line naming each joining rank's phase)."""
    ranks = {r["rank_id"]: r for r in state.get("ranks", [])}
    phases = [(rid, rank_phase(ranks[rid], state.get("scaling"))) for rid in joining if rid in ranks]
    if not phases:
        return 0, "waiting for the head to submit the rank(s)"
    ready = sum(1 for rid, phase in phases if phase == "ready" and rid in state.get("members", []))
    return ready, ", ".join(f"rank {rid} {phase}" for rid, phase in phases)


class JoinView:
    def __init__(self, n: int, stream=None) -> None:
        self.stream = stream or sys.stderr
        self.last = ""
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.bar = tqdm(total=n, desc="grow", unit="rank", file=self.stream, dynamic_ncols=True,
                        bar_format="{desc}: {n}/{total} ready |{bar}| {elapsed}{postfix}") if tty else None
        self.n = n

    def show(self, state: dict, known: set[int]) -> None:
        joining = sorted(r["rank_id"] for r in state.get("ranks", []) if r["rank_id"] not in known)
        ready, text = describe(state, joining)
        if self.bar is not None:
            self.bar.n = ready
            self.bar.set_postfix_str(text)  # refreshes
        elif text != self.last:
            print(f"grow: {ready}/{self.n} ready: {text}", file=self.stream, flush=True)
        self.last = text

    def close(self, joined: bool) -> None:
        if self.bar is not None:
            if joined:
                self.bar.n = self.n
                self.bar.set_postfix_str("joined")
            self.bar.close()


async def grow_watching(url: str, headers: dict, body: dict, timeout: float, n: int, stream=None) -> httpx.Response:
    """POST /admin/scale/grow and show the joining ranks until it answers; returns its response."""
    async with httpx.AsyncClient(timeout=timeout, headers=headers) as client:
        before = await client.get(f"{url}/admin/state")
        if before.status_code != 200:  # refused (no admin token, ...): the CLI prints why
            return before
        known = {r["rank_id"] for r in before.json()["ranks"]}
        post = asyncio.ensure_future(client.post(f"{url}/admin/scale/grow", json=body))
        view = JoinView(n, stream)
        joined = False
        try:
            while not post.done():
                await asyncio.wait({post}, timeout=POLL_S)
                if post.done():
                    break
                try:
                    r = await client.get(f"{url}/admin/state", timeout=10)
                except httpx.HTTPError:
                    continue  # the answer to the grow is what counts
                if r.status_code == 200:
                    view.show(r.json(), known)
            joined = post.result().status_code == 200
        finally:
            view.close(joined)
            if not post.done():
                post.cancel()
        return await post
