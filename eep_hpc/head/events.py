"""One scaling event (grow, shrink, rebalance, recover) as a state machine, with its measurements.

PREPARING → COMMITTING → DONE, or → ROLLED_BACK from either of the first two. Exactly one event runs at a time
(epoch_exchange.py drives it); a second is refused with `ScaleBusy` (a clear 409 for the API) instead of queueing it
behind a stuck one, and every exit path — success, failure, timeout, cancellation — leaves `phase` terminal, so
"already scaling" can never outlive the event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum, auto, unique


@unique
class ScalePhase(Enum):
    PREPARING = auto()
    COMMITTING = auto()
    DONE = auto()
    ROLLED_BACK = auto()


class ScaleBusy(RuntimeError):
    pass


class ScaleFailed(RuntimeError):
    pass


@dataclass
class ScaleEvent:
    kind: str  # "grow" | "shrink" | "rebalance" | "recover" (members lost abruptly)
    epoch: int
    old_members: list[int]
    new_members: list[int]
    phase: ScalePhase = ScalePhase.PREPARING
    started: float = field(default_factory=time.monotonic)
    prepare_s: float = 0.0
    commit_s: float = 0.0
    commit_pause_ms: float = 0.0  # longest inter-token gap any stream saw around the commit
    bytes_moved: int = 0
    prepare_pause_s: float = 0.0  # the longest a serving member stopped serving for the prepare
    served_while_preparing: int | None = None  # the fewest steps a serving member ran while its experts arrived
    experts_moved: int = 0
    requests_migrated: int = 0
    dense_source: str = ""  # where joiners got their non-expert weights: "nixl:<rank>" / "checkpoint"
    dense_bytes: int = 0
    error: str = ""
    lost: list[int] = field(default_factory=list)  # recover: members that died (not participants)
    detect_s: float = 0.0  # recover: from the lost ranks' last message to the start of the event
    progressed: float = 0.0  # when a participant last said its expert reads go on (PrepareProgress)
    reads: dict[int, tuple[int, int]] = field(default_factory=dict)  # rank id -> its reads' (bytes in, bytes in all)

    @property
    def joining(self) -> list[int]:
        return [r for r in self.new_members if r not in self.old_members]

    @property
    def leaving(self) -> list[int]:
        return [r for r in self.old_members if r not in self.new_members]

    @property
    def departing(self) -> list[int]:
        """Leaving in order (drained, told to exit): the leaving ranks that were not lost."""
        return [r for r in self.leaving if r not in self.lost]

    @property
    def participants(self) -> list[int]:
        return [r for r in self.old_members if r not in self.lost] + self.joining

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.prepare_s / 1e9 if self.prepare_s > 0 else 0.0

    def summary(self) -> dict:
        return {
            "kind": self.kind, "epoch": self.epoch, "phase": self.phase.name,
            "from_ranks": len(self.old_members), "to_ranks": len(self.new_members),
            "joined": self.joining, "left": self.leaving,  # rank ids
            "prepare_s": round(self.prepare_s, 4), "commit_s": round(self.commit_s, 4),
            "commit_pause_ms": round(self.commit_pause_ms, 2), "prepare_pause_s": round(self.prepare_pause_s, 4),
            "served_while_preparing": self.served_while_preparing or 0, "bytes_moved": self.bytes_moved,
            "experts_moved": self.experts_moved, "gbps": round(self.gbps, 4),
            "requests_migrated": self.requests_migrated, "dense_source": self.dense_source,
            "dense_bytes": self.dense_bytes, "error": self.error,
            **({"reads_received": sum(n for n, _ in self.reads.values()),
                "reads_total": sum(t for _, t in self.reads.values())}
               if self.reads and self.phase is ScalePhase.PREPARING else {}),
            **({"lost": self.lost, "detect_s": round(self.detect_s, 3),
                "recovery_s": round(self.detect_s + self.prepare_s + self.commit_s, 3)} if self.kind == "recover" else {}),
        }


def _rank_ids(ids: list[int]) -> str:
    return ", ".join(str(r) for r in ids)


def describe_event(e: dict) -> str:
    """One line for an event's summary (ScaleEvent.summary(), or /admin's JSON of it): what `eep-hpc` prints and the
    head logs."""
    if e.get("phase") == "UNCHANGED":  # a rebalance that found the serving placement already the best one
        return (f"{e['kind']}: placement unchanged, nothing moved (still epoch {e['epoch']}, "
                f"{e['to_ranks']} ranks)")
    who = []
    if e.get("lost"):
        who.append(f"rank(s) {_rank_ids(e['lost'])} lost, detected in {e['detect_s']:.3f} s, "
                   f"serving again in {e['recovery_s']:.3f} s")
    if e.get("joined"):
        who.append(f"rank(s) {_rank_ids(e['joined'])} joined")
    left = [r for r in e.get("left", []) if r not in e.get("lost", [])]
    if left:
        who.append(f"rank(s) {_rank_ids(left)} left")
    return (f"{e['kind']} {e['from_ranks']} -> {e['to_ranks']} ranks (epoch {e['epoch']}, {e['phase'].lower()}): "
            + "".join(w + ", " for w in who) +
            f"prepare {e['prepare_s']:.3f} s (serving paused {e.get('prepare_pause_s', 0):.3f} s), "
            f"commit pause {e['commit_pause_ms']:.1f} ms, "
            f"{e['bytes_moved'] / 2**20:.2f} MiB moved at {e['gbps']:.3f} GB/s, "
            f"{e['requests_migrated']} request(s) migrated" + (f", error: {e['error']}" if e.get("error") else ""))
