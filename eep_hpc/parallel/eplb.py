"""Expert placement (EPLB): which logical expert each physical slot holds, and the copies to get there.

Glossary
--------
logical expert  One of the E experts of an MoE layer as the checkpoint numbers them, ``e`` in ``[0, E)``.
physical slot   One expert-sized weight buffer on a rank. There are S slots in all, numbered rank by rank:
                rank ``i`` owns slots ``[slot_offsets[i], slot_offsets[i + 1])``. Ranks may own different
                numbers of slots (mixed node shapes); every slot always holds an expert.
replica         A slot holding a copy of a logical expert. Every expert has at least one; hot experts get
                redundant ones and the router splits their tokens evenly over them.
placement       ``physical_to_logical`` ``[L, S]`` (the expert in each slot, per MoE layer) + ``slot_offsets``.
load            ``[L, E]`` tokens routed to each logical expert over some window (any non-negative numbers).
replica load    ``load[e] / replicas(e)``: the tokens one replica of ``e`` serves.
rank load       The sum of the replica loads of a rank's slots. A rank owning ``c`` of the S slots has the
                fair share ``c * T / S`` of the layer's total load T; its excess is rank load - fair share.
rank id         The stable id of a rank across epochs; positions in an epoch's rank list may change.

Worked example
--------------
One layer, E = 4, ``load = [60, 20, 10, 10]`` (T = 100), ``slots_per_rank = [2, 3]`` (S = 5).

1. Replicate (as DeepSeek's EPLB): one replica each, then every spare slot goes to the expert with the highest
   load per replica. The one spare goes to expert 0: replicas ``[2, 1, 1, 1]``, replica loads ``[30, 20, 10, 10]``.
2. Pack: fair shares are 40 and 60. Heaviest replica first, each to the rank with the most unused fair share
   per free slot that does not hold that expert yet: 0 (30) -> rank 0 (40/2 = 20 beats 60/3 = 20 by index),
   0 (30) -> rank 1, 1 (20) -> rank 1 (30/2 = 15 beats 10/1), 2 (10) -> rank 0, 3 (10) -> rank 1.
   Rank loads 40 and 60: exactly the fair shares, so no swap improves them.
3. Arrange: each rank lists its experts in ascending order, so ``physical_to_logical = [[0, 2, 0, 1, 3]]``,
   ``slot_offsets = [0, 2, 5]``.

Say these ranks have ids 10 and 11, and rank 10 is leaving while rank 12, also with 2 slots, joins. The caller maps
the old placement onto the new rank list ``[11, 12]`` with ``align_previous`` (rank 11 keeps ``[0, 1, 3]``, rank
12 is empty) and passes it as ``previous``: ``rebalance(load, [3, 2], previous)`` leaves rank 11 untouched and gives
rank 12 ``[0, 2]``. ``plan_moves`` then lists two copies, experts 0 and 2, both from rank 10 while it is still
there (it is the only holder of expert 2; expert 0 has two holders that have sent nothing yet, and ties go to the
earlier one).

Balance is relative to capacity: packing ends when no single swap lowers the largest excess. Unless the rule "no
two replicas of an expert on one rank" blocks the swap needed, this leaves every rank at most ``max - min`` replica
load (so less than the heaviest replica) above its fair share (see ``_LayerPacking``). It can block when an expert
has a replica on every rank: then even a rank with few slots holds it.

API
---
``Placement``                                    the tables, with helpers (slots of a rank, replicas of an expert)
``initial_placement(L, E, slots_per_rank)``      load-oblivious start: slot s holds expert ``s % E``
``replicate(load, S, R)``                        replica counts [L, E]
``rebalance(load, slots_per_rank, previous)``    replicate + pack; with ``previous``, keep experts in their slots
``align_previous(old, old_ids, new_ids, slots)`` view of an old placement on a new rank list, as ``previous``
``plan_moves(old, old_ids, new, new_ids)``       the expert copies (``ExpertMove``) that turn ``old`` into ``new``

All functions are pure (tensors and lists in, new objects out) and deterministic; they run on CPU.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

EMPTY = -1  # physical_to_logical value of a slot with no known expert (only in ``align_previous`` hints)


@dataclass(frozen=True, eq=False)
class Placement:
    """Which logical expert each physical slot holds. Treat the tensor as read-only.

    physical_to_logical: [L, S] int64, logical expert of each slot per MoE layer (EMPTY only in hints).
    slot_offsets: len R + 1, from 0 to S; rank i owns slots [slot_offsets[i], slot_offsets[i + 1]).
    """

    physical_to_logical: torch.Tensor
    slot_offsets: list[int]

    def __post_init__(self) -> None:
        p2l, offsets = self.physical_to_logical, self.slot_offsets
        if p2l.dim() != 2 or p2l.dtype != torch.int64:
            raise ValueError(f"physical_to_logical must be [L, S] int64, got {p2l.dtype} {tuple(p2l.shape)}")
        if not offsets or offsets[0] != 0 or offsets[-1] != p2l.shape[1]:
            raise ValueError(f"slot_offsets must run from 0 to S={p2l.shape[1]}, got {offsets}")
        if any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"slot_offsets must not decrease, got {offsets}")
        if p2l.numel() and int(p2l.min()) < EMPTY:
            raise ValueError("physical_to_logical holds a negative expert id other than EMPTY")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self.slot_offsets == other.slot_offsets and torch.equal(
            self.physical_to_logical, other.physical_to_logical
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside

    @property
    def num_layers(self) -> int:
        return self.physical_to_logical.shape[0]

    @property
    def num_slots(self) -> int:
        return self.physical_to_logical.shape[1]

    @property
    def num_ranks(self) -> int:
        return len(self.slot_offsets) - 1

    @property
    def num_experts(self) -> int:
        """E as seen in the table (largest expert id + 1); a complete placement holds every expert."""
        return int(self.physical_to_logical.max()) + 1 if self.physical_to_logical.numel() else 0

    @property
    def slots_per_rank(self) -> list[int]:
        return [b - a for a, b in zip(self.slot_offsets, self.slot_offsets[1:])]

    def slots_of(self, rank: int) -> range:
        """Global slot indices owned by rank position ``rank``."""
        return range(self.slot_offsets[rank], self.slot_offsets[rank + 1])

    def owner_of_slot(self, slot: int) -> int:
        """Rank position owning global slot ``slot``."""
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} out of range [0, {self.num_slots})")
        return bisect.bisect_right(self.slot_offsets, slot) - 1

    def logical_to_physical(self, layer: int) -> list[list[int]]:
        """For each logical expert, the global slots holding it in ``layer`` (ascending)."""
        replicas: list[list[int]] = [[] for _ in range(self.num_experts)]
        for slot, e in enumerate(self.physical_to_logical[layer].tolist()):
            if e != EMPTY:
                replicas[e].append(slot)
        return replicas

    @property
    def replica_counts(self) -> torch.Tensor:
        """[L, E] int64: number of slots holding each logical expert, per layer."""
        counts = torch.zeros(self.num_layers, self.num_experts + 1, dtype=torch.int64)
        counts.scatter_add_(1, self.physical_to_logical + 1, torch.ones_like(self.physical_to_logical))
        return counts[:, 1:]  # column 0 counted EMPTY


def _offsets(slots_per_rank: list[int]) -> list[int]:
    if any(c < 0 for c in slots_per_rank) or not slots_per_rank:
        raise ValueError(f"slots_per_rank must be a non-empty list of non-negative ints, got {slots_per_rank}")
    offsets = [0]
    for c in slots_per_rank:
        offsets.append(offsets[-1] + c)
    return offsets


def initial_placement(num_layers: int, num_experts: int, slots_per_rank: list[int]) -> Placement:
    """Load-oblivious placement: slot s holds expert ``s % E`` in every layer (contiguous, deterministic)."""
    offsets = _offsets(slots_per_rank)
    if offsets[-1] < num_experts or num_experts < 1:
        raise ValueError(f"{offsets[-1]} slots cannot hold {num_experts} experts")
    row = torch.arange(offsets[-1], dtype=torch.int64) % num_experts
    return Placement(row.repeat(num_layers, 1), offsets)


def replicate(load: torch.Tensor, num_slots: int, num_ranks: int) -> torch.Tensor:
    """Replica counts [L, E] int64 for load [L, E]: one each, then spare slots one by one to the highest load/replicas.

    As in DeepSeek's EPLB, except that an expert gets more than ``num_ranks`` replicas only once every expert has
    ``num_ranks`` (a second replica on a rank that holds one already serves no tokens the first could not). Ties go
    to the lowest expert id.
    """
    num_layers, num_experts = load.shape
    counts = torch.ones(num_layers, num_experts, dtype=torch.int64)
    layers = torch.arange(num_layers)
    for _ in range(num_slots - num_experts):
        per_replica = load / counts
        capped = counts >= num_ranks
        capped &= ~capped.all(dim=1, keepdim=True)  # no room below the cap: fall back to every expert
        per_replica = per_replica.masked_fill(capped, -1.0)
        counts[layers, per_replica.argmax(dim=1)] += 1  # argmax returns the first maximum
    return counts


def rebalance(
    load: torch.Tensor, slots_per_rank: list[int], previous: Placement | None = None, *, slack: float = 0.0
) -> Placement:
    """Place replicas of E experts on ranks of the given capacities, balancing load relative to capacity.

    load: [L, E] tokens per logical expert (float or int, non-negative).
    slots_per_rank: capacity of each rank position; S = sum >= E, and every slot gets a replica.
    previous: the placement now in force, on the same rank positions (map it with ``align_previous`` when ranks
        left or joined; EMPTY slots are allowed). Experts stay where they were where possible: per rank, an expert
        it held before returns to its old slot. With the same load and capacities as ``previous`` was built from,
        the result equals ``previous``.
    slack: stop balancing once no rank's load exceeds its fair share by more than ``slack`` average replica loads
        (T / S). 0 balances as far as swaps go; a little slack (e.g. 0.5) saves moves when loads are noisy;
        ``math.inf`` skips balancing swaps: copies only where replica counts changed (or duplicates are undone).
    """
    if load.dim() != 2 or load.shape[1] < 1:
        raise ValueError(f"load must be [L, E] with E >= 1, got {tuple(load.shape)}")
    load = load.detach().to(device="cpu", dtype=torch.float64)
    if not bool(torch.isfinite(load).all()) or bool((load < 0).any()):
        raise ValueError("load must be finite and non-negative")
    num_layers, num_experts = load.shape
    offsets = _offsets(slots_per_rank)
    num_ranks, num_slots = len(slots_per_rank), offsets[-1]
    if num_slots < num_experts:
        raise ValueError(f"{num_slots} slots cannot hold {num_experts} experts")
    if previous is not None:
        if previous.num_ranks != num_ranks or previous.num_layers != num_layers:
            raise ValueError(
                f"previous has {previous.num_ranks} ranks x {previous.num_layers} layers, expected {num_ranks} x "
                f"{num_layers}; map it onto the new rank list with align_previous()"
            )
        if previous.num_experts > num_experts:
            raise ValueError(f"previous holds expert {previous.num_experts - 1} >= E={num_experts}")

    counts = replicate(load, num_slots, num_ranks)
    table = torch.empty(num_layers, num_slots, dtype=torch.int64)
    for layer in range(num_layers):
        old_slots = _previous_slots(previous, layer, slots_per_rank)
        packing = _LayerPacking(load[layer] / counts[layer], slots_per_rank, old_slots)
        packing.pack(counts[layer].tolist(), slack)
        table[layer] = torch.tensor(packing.arrange(), dtype=torch.int64)
    return Placement(table, offsets)


def _previous_slots(previous: Placement | None, layer: int, slots_per_rank: list[int]) -> list[list[int]]:
    """Per rank position, the expert previously in each of its (new) slots; EMPTY where unknown."""
    if previous is None:
        return [[EMPTY] * c for c in slots_per_rank]
    row = previous.physical_to_logical[layer].tolist()
    result = []
    for rank, c in enumerate(slots_per_rank):
        old = row[previous.slot_offsets[rank] : previous.slot_offsets[rank + 1]][:c]
        result.append(old + [EMPTY] * (c - len(old)))
    return result


class _LayerPacking:
    """Replicas of one layer onto ranks: greedy fill, then swaps. Scratch state of one ``rebalance`` call.

    State: ``has`` [R, E] replicas of each expert on each rank; ``prev`` [R, E] how many of the rank's slots held
    the expert before; ``weight`` [E] replica load; ``load``/``fair`` [R] rank load and fair share c_r * T / S.

    1. Keep: heaviest replica first, a replica stays on a rank that held its expert before (the one with the most
       unused fair share per free slot), as long as the expert needs replicas.
    2. Fill: the remaining replicas, heaviest first, go to the rank with free slots that has the most unused fair
       share per free slot, avoiding ranks that hold the expert already.
    3. Improve, until neither applies: (a) remove a duplicate (two replicas of an expert on one rank) by swapping
       one with a replica on another rank, if no new duplicate results; (b) swap a replica of the rank with the
       largest excess for a lighter one elsewhere (no new duplicate) if that lowers the larger of the two excesses.
       Among candidates, fewest slots losing their old expert first, then the lowest resulting excess.
    The end state is a fixed point, which is why ``rebalance(load, caps, previous=result)`` returns ``result``.
    Bound: at a fixed point, take the max-excess rank a, its heaviest replica x and the lightest replica y of a rank
    b with excess <= 0 (one exists: excesses sum to 0). If that swap is allowed and x > y, not improving means
    excess_a <= excess_b + x - y <= max - min replica load (if x <= y, a's average replica is at most b's, so
    excess_a <= 0). Only the no-duplicate rule can disallow it; with ``slack`` the bound grows to at most
    ``slack * T / S`` if that is larger.
    """

    # Safety net only: every improve step removes a duplicate or lowers the sorted excesses (from the top).
    MAX_STEPS_PER_SLOT = 16

    def __init__(self, weight: torch.Tensor, slots_per_rank: list[int], old_slots: list[list[int]]) -> None:
        num_experts = weight.shape[0]
        self.weight = weight
        self.slots = torch.tensor(slots_per_rank, dtype=torch.int64)
        self.old_slots = old_slots
        self.prev = torch.zeros(len(slots_per_rank), num_experts, dtype=torch.int64)
        for rank, row in enumerate(old_slots):
            for e in row:
                if e != EMPTY:
                    self.prev[rank, e] += 1
        self.has = torch.zeros_like(self.prev)
        self.load = torch.zeros(len(slots_per_rank), dtype=torch.float64)

    def pack(self, counts: list[int], slack: float) -> None:
        total = float(sum(w * n for w, n in zip(self.weight.tolist(), counts)))
        num_slots = int(self.slots.sum())
        self.fair = self.slots.to(torch.float64) * (total / num_slots)
        self.tol = 1e-9 * total / num_slots
        self.good_enough = slack * total / num_slots if total > 0 else 0.0
        order = sorted(range(len(counts)), key=lambda e: (-float(self.weight[e]), e))
        pending = []
        for e in order:  # 1. keep
            for _ in range(counts[e]):
                if not self._place(e, self.prev[:, e] > self.has[:, e]):
                    pending.append(e)
        for e in pending:  # 2. fill
            self._place(e, torch.ones_like(self.load, dtype=torch.bool), required=True)
        for _ in range(self.MAX_STEPS_PER_SLOT * num_slots + 16):  # 3. improve
            if not (self._remove_duplicate() or self._lower_max_excess()):
                break

    def _place(self, e: int, allowed: torch.Tensor, required: bool = False) -> bool:
        """Put a replica of ``e`` on the allowed rank with free slots with the most fair share left per free slot."""
        free = self.slots - self.has.sum(dim=1)
        allowed = allowed & (free > 0)
        if bool((allowed & (self.has[:, e] == 0)).any()):
            allowed &= self.has[:, e] == 0
        if not bool(allowed.any()):
            assert not required, "more replicas than slots"
            return False
        room = (self.fair - self.load) / free.clamp(min=1)
        rank = int(room.masked_fill(~allowed, -torch.inf).argmax())
        self.has[rank, e] += 1
        self.load[rank] += self.weight[e]
        return True

    def _swap_candidates(self, a: int, xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All swaps of a replica of expert xs[i] on rank a with a replica (rank b, expert y) elsewhere.

        Returns per pair [X, P]: whether allowed (no new duplicate), the weight moved a -> b, the larger resulting
        excess of a and b, and how many more slots lose their old expert. Pairs are in (x, b, y) order.
        """
        b, y = self.has.nonzero(as_tuple=True)  # [P] every (rank, expert) with a replica, row-major
        x = xs[:, None]
        allowed = (b != a)[None, :] & (self.has[a, y] == 0)[None, :] & (self.has[b[None, :], x] == 0)
        moved = self.weight[x] - self.weight[y][None, :]
        excess = self.load - self.fair
        worst = torch.maximum(excess[a] - moved, excess[b][None, :] + moved)
        # A slot loses its old expert when a replica leaves a rank where it is counted as kept.
        lost = (self.has[a, x] <= self.prev[a, x]).long() + (self.has[b, y] <= self.prev[b, y]).long()[None, :]
        regained = (self.prev[a, y] > 0).long()[None, :] + (self.prev[b[None, :], x] > 0).long()
        return allowed, moved, worst, lost - regained, b, y

    def _swap(self, a: int, x: int, b: int, y: int) -> None:
        self.has[a, x] -= 1
        self.has[b, x] += 1
        self.has[b, y] -= 1
        self.has[a, y] += 1
        moved = self.weight[x] - self.weight[y]
        self.load[a] -= moved
        self.load[b] += moved

    @staticmethod
    def _best(keep: torch.Tensor, worst: torch.Tensor, cost: torch.Tensor) -> int:
        """Flat index of the kept candidate with the lowest (cost, worst), first in order among ties."""
        cost = cost.masked_fill(~keep, torch.iinfo(torch.int64).max)
        keep = keep & (cost == cost.min())
        return int(worst.masked_fill(~keep, torch.inf).flatten().argmin())

    def _remove_duplicate(self) -> bool:
        for a, e in self.has.ge(2).nonzero().tolist():
            xs = torch.tensor([e])
            allowed, _, worst, cost, b, y = self._swap_candidates(a, xs)
            if bool(allowed.any()):
                i = self._best(allowed, worst, cost)
                self._swap(a, e, int(b[i]), int(y[i]))
                return True
        return False

    def _lower_max_excess(self) -> bool:
        a = int((self.load - self.fair).argmax())
        xs = self.has[a].nonzero().squeeze(1)
        if xs.numel() == 0:
            return False
        allowed, moved, worst, cost, b, y = self._swap_candidates(a, xs)
        excess_a = float(self.load[a] - self.fair[a])
        if excess_a <= self.good_enough:
            return False
        improving = allowed & (moved > 0) & (worst < excess_a - self.tol)
        if not bool(improving.any()):
            return False
        i = self._best(improving, worst, cost)
        ix, iy = divmod(i, b.numel())
        self._swap(a, int(xs[ix]), int(b[iy]), int(y[iy]))
        return True

    def arrange(self) -> list[int]:
        """Slots rank by rank: an expert returns to a slot it held before; the rest fill free slots ascending."""
        row = []
        for rank, old in enumerate(self.old_slots):
            left = self.has[rank].clone()
            slots = [EMPTY] * len(old)
            for k, e in enumerate(old):
                if e != EMPTY and left[e] > 0:
                    slots[k] = e
                    left[e] -= 1
            rest = iter([e for e, n in enumerate(left.tolist()) for _ in range(n)])
            row.extend(e if e != EMPTY else next(rest) for e in slots)
        return row


def align_previous(
    old: Placement, old_rank_ids: list[int], new_rank_ids: list[int], slots_per_rank: list[int]
) -> Placement:
    """``old`` seen on the new rank list, as the ``previous`` hint of ``rebalance``.

    A rank present in both lists (matched by id) keeps its old experts in its first ``slots_per_rank[i]`` slots;
    a joining rank's slots, and slots beyond a rank's old capacity, are EMPTY. Departing ranks are dropped.
    """
    _check_ids(old, old_rank_ids, "old")
    offsets = _offsets(slots_per_rank)
    if len(new_rank_ids) != len(slots_per_rank) or len(set(new_rank_ids)) != len(new_rank_ids):
        raise ValueError(f"need {len(slots_per_rank)} distinct new rank ids, got {new_rank_ids}")
    position = {rank_id: i for i, rank_id in enumerate(old_rank_ids)}
    table = torch.full((old.num_layers, offsets[-1]), EMPTY, dtype=torch.int64)
    for i, rank_id in enumerate(new_rank_ids):
        if rank_id in position:
            src = old.slots_of(position[rank_id])
            n = min(len(src), slots_per_rank[i])
            table[:, offsets[i] : offsets[i] + n] = old.physical_to_logical[:, src.start : src.start + n]
    return Placement(table, offsets)


@dataclass(frozen=True)
class ExpertMove:
    """Copy logical expert ``logical`` of ``layer`` from rank id ``src_rank`` (which holds it in the OLD placement)
    into global slot ``dst_slot`` of the NEW placement, owned by rank id ``dst_rank``. ``src_rank == dst_rank``
    is a local copy. Sources refer to old contents: read them before overwriting any slot."""

    layer: int
    logical: int
    src_rank: int
    dst_rank: int
    dst_slot: int


CHECKPOINT = -1  # source "rank" of a move whose every holder was lost: the expert is read from the checkpoint


def plan_moves(old: Placement, old_rank_ids: list[int], new: Placement, new_rank_ids: list[int],
               lost: frozenset[int] | set[int] = frozenset()) -> list[ExpertMove]:
    """The copies that turn ``old`` into ``new``, ordered by (layer, new rank position, slot).

    A new slot is identified by (rank id, index within that rank's slots); it needs no copy when the same slot held
    the same expert in ``old``. Otherwise the source is the destination rank itself if it held the expert in another
    slot, else the rank that held it with the fewest copies to other ranks planned so far (ties: earlier in
    ``old_rank_ids``).
    Departing ranks (in ``old`` only) are sources like any other; `lost` ranks (died) are never sources, and an
    expert only they held comes from CHECKPOINT. Raises ValueError when no old rank held an expert.
    """
    _check_ids(old, old_rank_ids, "old")
    _check_ids(new, new_rank_ids, "new")
    if old.num_layers != new.num_layers:
        raise ValueError(f"old has {old.num_layers} layers, new has {new.num_layers}")
    if new.num_slots and int(new.physical_to_logical.min()) == EMPTY:
        raise ValueError("new placement has empty slots")
    position = {rank_id: i for i, rank_id in enumerate(old_rank_ids)}
    sent = {rank_id: 0 for rank_id in old_rank_ids}
    moves = []
    for layer in range(new.num_layers):
        old_row = old.physical_to_logical[layer].tolist()
        old_slots = [old_row[s.start : s.stop] for s in map(old.slots_of, range(old.num_ranks))]
        holders: dict[int, list[int]] = {}
        for i, rank_id in enumerate(old_rank_ids):
            for e in dict.fromkeys(old_slots[i]):
                holders.setdefault(e, [])
                if rank_id not in lost:
                    holders[e].append(rank_id)
        new_row = new.physical_to_logical[layer].tolist()
        for j, dst in enumerate(new_rank_ids):
            before = old_slots[position[dst]] if dst in position else []
            for k, slot in enumerate(new.slots_of(j)):
                e = new_row[slot]
                if k < len(before) and before[k] == e:
                    continue
                if e in before:
                    src = dst  # local copy: not counted as sending
                elif holders.get(e):
                    src = min(holders[e], key=lambda r: (sent[r], position[r]))
                    sent[src] += 1
                elif e in holders:
                    src = CHECKPOINT
                else:
                    raise ValueError(f"layer {layer}: expert {e} of the new placement has no holder in the old one")
                moves.append(ExpertMove(layer, e, src, dst, slot))
    return moves


def _check_ids(placement: Placement, rank_ids: list[int], name: str) -> None:
    if len(rank_ids) != placement.num_ranks or len(set(rank_ids)) != len(rank_ids):
        raise ValueError(f"{name}_rank_ids must be {placement.num_ranks} distinct ids, got {rank_ids}")
