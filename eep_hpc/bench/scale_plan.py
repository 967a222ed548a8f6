"""Grow and shrink the serving group through the admin API while the load runs.

A plan is a list of rank counts, e.g. 1,2,4,2,1. Before each step the plan waits `interval` seconds, then moves
from the current number of member ranks (len(GET /admin/state ["members"])) to the step's count:
POST /admin/scale/grow {"n": k} or POST /admin/scale/shrink {"n": k}. A step equal to the current count is a no-op
(no event). A step `rebalance` re-places the experts by the load so far (POST /admin/rebalance; no event when the
placement would not change). Every event's summary is recorded; one that was refused while another event ran (409) is retried;
one that was rolled back (503) is recorded with phase ROLLED_BACK, and the plan goes on from the real count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

BUSY_RETRY_S = 1.0
BUSY_GIVE_UP_S = 300.0


REBALANCE = "rebalance"


def parse_plan(text: str) -> list[int | str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    try:
        plan = [x if x == REBALANCE else int(x) for x in items]
    except ValueError:
        raise ValueError(f"--scale-plan must be comma-separated rank counts (or {REBALANCE}) like 1,2,4,2,1, got "
                         f"{text!r}") from None
    counts = [x for x in plan if x != REBALANCE]
    if not plan or (counts and min(counts) < 1):
        raise ValueError(f"--scale-plan needs rank counts of at least 1, got {text!r}")
    return plan


TIMED_KINDS = ("grow", "shrink", "kill")


def parse_timed_plan(text: str) -> list[tuple[str, float]]:
    """`eep-hpc bench-head --scale-plan`: events at times into the load, e.g. "grow@5,kill@12" -> [("grow", 5.0),
    ("kill", 12.0)]. grow / shrink: one rank more / fewer through the admin API (as a rank-count step here);
    kill: SIGKILL of one member rank's process (the head must notice and recover). In time order."""
    plan = []
    for item in (x.strip() for x in text.split(",") if x.strip()):
        kind, _, at = item.partition("@")
        try:
            t = float(at)
        except ValueError:
            t = -1.0
        if kind not in TIMED_KINDS or t < 0:
            raise ValueError(f"--scale-plan wants events like grow@5,kill@12 (one of {', '.join(TIMED_KINDS)} at "
                             f"seconds into the load), got {item!r}")
        plan.append((kind, t))
    if not plan:
        raise ValueError(f"--scale-plan names no event: {text!r}")
    return sorted(plan, key=lambda e: e[1])


def event_line(e: dict) -> str:
    line = f"scale {e.get('kind', '?')} {e.get('from_ranks', '?')} -> {e.get('to_ranks', '?')} ranks"
    line += f" (epoch {e.get('epoch', '?')}, {str(e.get('phase', '?')).lower()})"
    if "prepare_s" in e:
        line += (f": prepare {e['prepare_s']:.3f} s ({e.get('served_while_preparing', 0)} steps served meanwhile, "
                 f"paused {e.get('prepare_pause_s', 0):.3f} s), commit {e.get('commit_s', 0):.3f} s, "
                 f"pause {e.get('commit_pause_ms', 0):.1f} ms, {e.get('bytes_moved', 0) / 2**20:.2f} MiB "
                 f"({e.get('experts_moved', 0)} experts) at {e.get('gbps', 0):.3f} GB/s, "
                 f"{e.get('requests_migrated', 0)} request(s) migrated")
    return line + (f", error: {e['error']}" if e.get("error") else "")


class ScalePlan:
    """Runs one plan; `events` holds each event's summary, plus `t_s` and `t_done_s`: seconds since the plan
    started when the request was sent and when it was answered."""

    def __init__(self, admin: httpx.AsyncClient, url: str, plan: list[int | str], interval: float,
                 on_event: Callable[[dict], None] = print) -> None:
        self.admin, self.url, self.plan, self.interval = admin, url, plan, interval
        self.on_event = on_event
        self.events: list[dict] = []
        self.start = 0.0

    async def ranks(self) -> int:
        r = await self.admin.get(f"{self.url}/admin/state")
        r.raise_for_status()
        return len(r.json()["members"])

    async def run(self) -> list[dict]:
        self.start = time.perf_counter()
        for target in self.plan:
            await asyncio.sleep(self.interval)
            current = await self.ranks()
            if target == REBALANCE:
                await self.step(current, current, REBALANCE)
            elif target != current:
                await self.step(current, target)
        return self.events

    async def step(self, current: int, target: int, kind: str = "") -> None:
        kind = kind or ("grow" if target > current else "shrink")
        path, body = ("rebalance", {}) if kind == REBALANCE else (f"scale/{kind}", {"n": abs(target - current)})
        deadline = time.perf_counter() + BUSY_GIVE_UP_S
        while True:
            t = time.perf_counter() - self.start
            r = await self.admin.post(f"{self.url}/admin/{path}", json=body)
            if r.status_code == 409 and time.perf_counter() < deadline:
                await asyncio.sleep(BUSY_RETRY_S)  # another event is running (not ours): wait for it
                continue
            break
        if r.status_code == 200:
            event = r.json()
            if event.get("phase") == "UNCHANGED":  # nothing to move: no event ran
                return
        else:
            event = await self.failed_event(kind, current, target, r)
        event["t_s"] = round(t, 3)
        event["t_done_s"] = round(time.perf_counter() - self.start, 3)
        self.events.append(event)
        self.on_event(event)

    async def failed_event(self, kind: str, current: int, target: int, r: httpx.Response) -> dict:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text[:300]
        event = {"kind": kind, "phase": "ROLLED_BACK" if r.status_code == 503 else "REFUSED",
                 "from_ranks": current, "to_ranks": target, "error": f"HTTP {r.status_code}: {message}"}
        if r.status_code == 503:  # the head keeps the rolled-back event's figures in its history
            state = (await self.admin.get(f"{self.url}/admin/state")).json()
            history = state.get("scale_events") or []
            if history and history[-1].get("kind") == kind and history[-1].get("phase") == "ROLLED_BACK":
                event = {**history[-1], "error": event["error"]}
        return event
