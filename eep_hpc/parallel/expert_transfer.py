"""Expert weights from the old placement into staging for the new one.

Each move is [layer, logical, src_rank_id, dst_rank_id, dst_global_slot, src_local_slot]. A rank builds its new
slot tensors from: slots no move touches (they keep what the same rank held at the same local index), local copies
(src == dst: the expert sat in another of its old slots), and remote copies, which arrive either by NIXL READs from
the source's published slots (no collective: a dead peer fails only its reader) or, without NIXL, by an all-to-all
over a transfer group of all participants. For the all-to-all every participant knows the move list, so counts need
no exchange: rank p sends, per layer, one row per move it sources for another rank, ordered by (destination
position, move order), and receives rows in (source position, move order). A row is one expert: its per-slot
tensors (w13 [2I, D], w2 [D, I], and for fp8 experts their scales) as bytes, one after the other.

An expert is the list of its per-slot tensors (`SlotTensors.kinds`): fp8 experts carry their block scales as two
more kinds, so scales are staged, copied and sent with their weights by the same code; over NIXL the scales are
published as layers L..2L-1 of the same descriptor table (`publish_slots`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep_hpc.parallel.groups import EpochGroup


@dataclass
class SlotTensors:
    """Expert slots, per MoE layer: w13 [S, 2I, D], w2 [S, D, I] and, for fp8 experts, their block scales
    w13_scale, w2_scale [S, ...] (None for experts in the serving dtype). A rank's old slots (None for a joining
    rank), or the shapes to stage for its new ones."""

    w13: list[torch.Tensor]
    w2: list[torch.Tensor]
    w13_scale: list[torch.Tensor] | None = None
    w2_scale: list[torch.Tensor] | None = None

    @classmethod
    def of_blocks(cls, blocks) -> SlotTensors:
        """The slot tensors of a model's MoE blocks (`model.moe_blocks()`), scales included."""
        fp8 = bool(blocks) and blocks[0].w13_scale is not None
        return cls([b.w13.data for b in blocks], [b.w2.data for b in blocks],
                   [b.w13_scale for b in blocks] if fp8 else None, [b.w2_scale for b in blocks] if fp8 else None)

    def kinds(self) -> list[list[torch.Tensor]]:
        """[kind][layer] -> [S, ...]: every per-slot tensor list, weights first."""
        return [self.w13, self.w2] + ([self.w13_scale, self.w2_scale] if self.w13_scale is not None else [])


@dataclass
class StagedExperts(SlotTensors):
    """The slots of the next epoch as staged. Either all of them (`rows` None: the tensors replace the live ones
    at commit), or, in place, only those that change (`rows[layer]`: the local slot of each staged row; commit
    copies them into the live tensors, which keep their addresses, so CUDA graphs that captured them stay valid,
    and staging costs the moved experts' memory, not a second copy of all of them)."""

    bytes_received: int = 0
    rows: list[list[int]] | None = None

    def row(self, layer: int, local_slot: int) -> int:
        """Where the expert of `local_slot` (in the new epoch's numbering) is staged in layer `layer`."""
        return local_slot if self.rows is None else self.rows[layer].index(local_slot)


def _slot_specs(like: SlotTensors | None, old: SlotTensors | None, shape: tuple[int, int], dtype: torch.dtype):
    """(per-slot shape, dtype) of each kind."""
    ref = like or old
    I, D = shape
    specs = ([(tuple(k[0].shape[1:]), k[0].dtype) for k in ref.kinds()] if ref is not None
             else [((2 * I, D), dtype), ((D, I), dtype)])
    if len(specs) == 2 and specs[0][1].itemsize == 1:
        raise ValueError("fp8 experts move with their scales: stage them like=SlotTensors.of_blocks(blocks)")
    return specs


def stage_experts(my_id: int, moves: list[list[int]], old: SlotTensors | None, new_start: int, new_end: int,
                  num_layers: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device,
                  like: SlotTensors | None = None, into: SlotTensors | None = None,
                  in_place: bool = False) -> tuple[StagedExperts, list]:
    """New slot tensors with untouched slots and local copies filled in -> (staged, remote moves still to fetch).
    The kinds staged (and their per-slot shapes) are those of `like` (this rank's model's slots), else of `old`,
    else w13/w2 of `shape` (I, D) and `dtype`. `into`: fill these tensors instead of allocating new ones (a
    joining rank's still empty slots: staging them twice would double its expert memory). `in_place` (the rank
    keeps its slot tensors, at least as many rows as it now owns): stage only the slots that moves fill
    (`StagedExperts.rows`)."""
    specs = _slot_specs(like, old, shape, dtype)
    if old is not None and len(old.kinds()) != len(specs):
        raise ValueError("the old expert slots lack the scales of fp8 experts: use SlotTensors.of_blocks(blocks)")
    n_new = new_end - new_start
    if in_place and (old is None or into is not None or old.w13[0].shape[0] < n_new):
        raise ValueError(f"in-place staging needs the old slots, at least as many as the new ({n_new})")
    kinds: list[list[torch.Tensor]] = [[] for _ in specs]
    rows: list[list[int]] = []
    remote = []
    for layer in range(num_layers):
        moved_here = sorted({m[4] - new_start for m in moves if m[0] == layer and m[3] == my_id})
        row = {s: i for i, s in enumerate(moved_here)} if in_place else None
        new = ([k[layer] for k in into.kinds()] if into is not None
               else [torch.empty(len(row) if in_place else n_new, *slot_shape, dtype=dt, device=device)
                     for slot_shape, dt in specs])
        olds = [k[layer] for k in old.kinds()] if old is not None else []
        if old is not None and not in_place:  # untouched slots keep what the same local index held
            for s in sorted(set(range(n_new)) - set(moved_here)):
                for t, o in zip(new, olds):
                    t[s] = o[s]
        for m in moves:
            if m[0] != layer or m[3] != my_id:
                continue
            if m[2] == my_id:
                at = m[4] - new_start if row is None else row[m[4] - new_start]
                for t, o in zip(new, olds):
                    t[at] = o[m[5]]
            else:
                remote.append(m)
        rows.append(moved_here)
        for k, t in zip(kinds, new):
            k.append(t)
    return StagedExperts(*kinds[:2], *(kinds[2:] or [None, None]), rows=rows if in_place else None), remote


def publish_slots(agent, epoch: int, slots: SlotTensors, reg=None) -> None:
    """`agent.publish_experts` for every kind: scales go as layers L..2L-1 (w13_scale beside w13, w2_scale beside
    w2), so a reader fetches them by the same (layer, slot) descriptors."""
    if slots.w13_scale is None:
        agent.publish_experts(epoch, slots.w13, slots.w2, reg)
    else:
        agent.publish_experts(epoch, slots.w13 + slots.w13_scale, slots.w2 + slots.w2_scale, reg)


def fetch_over_nixl(agent, source_epoch: int, staged: StagedExperts, remote: list[list[int]], new_start: int,
                    gbps: float = 0.0):
    """Start the remote copies as NIXL READs into the staging tensors -> (the reads under way, their registration).
    Nothing waits: poll the reads' `done()` (a serving rank does so between steps); `gbps` caps their rate. The
    registration is kept: after the commit the staging tensors are what this rank serves to peers."""
    every = [t for k in staged.kinds() for t in k if t.numel()]
    reg = agent.register(every) if every else None
    try:
        L = len(staged.w13)
        at = [(m[0], staged.row(m[0], m[4] - new_start)) for m in remote]
        reads = [(m[2], m[0], m[5], staged.w13[layer][r], staged.w2[layer][r]) for m, (layer, r) in zip(remote, at)]
        if staged.w13_scale is not None:
            reads += [(m[2], L + m[0], m[5], staged.w13_scale[layer][r], staged.w2_scale[layer][r])
                      for m, (layer, r) in zip(remote, at)]
        return agent.start_fetch_experts(source_epoch, reads, gbps=gbps), reg
    except BaseException:
        if reg is not None:
            agent.deregister(reg)
        raise


def exchange_over_group(group: EpochGroup, participants: list[int], my_id: int, moves: list[list[int]],
                        old: SlotTensors | None, staged: StagedExperts, new_start: int, num_layers: int,
                        shape: tuple[int, int]) -> int:
    """Remote copies by one all-to-all per layer over `group`; rows are experts as bytes (all kinds) -> bytes."""
    pos = {rid: i for i, rid in enumerate(participants)}
    device = staged.w13[0].device
    slot_bytes = [k[0].shape[1:].numel() * k[0].element_size() for k in staged.kinds()]
    row_bytes = sum(slot_bytes)
    received = 0
    for layer in range(num_layers):
        layer_moves = [m for m in moves if m[0] == layer]
        sends = sorted((pos[m[3]], i) for i, m in enumerate(layer_moves) if m[2] == my_id and m[3] != my_id)
        recvs = sorted((pos[m[2]], i) for i, m in enumerate(layer_moves) if m[3] == my_id and m[2] != my_id)
        send_counts, recv_counts = [0] * group.size, [0] * group.size
        for p, _ in sends:
            send_counts[p] += 1
        for p, _ in recvs:
            recv_counts[p] += 1
        rows = [torch.cat([k[layer][layer_moves[i][5]].reshape(-1).view(torch.uint8) for k in old.kinds()])
                for _, i in sends]
        send = torch.stack(rows) if rows else torch.empty(0, row_bytes, dtype=torch.uint8, device=device)
        recv = torch.empty(len(recvs), row_bytes, dtype=torch.uint8, device=device)
        group.all_to_all(recv, send, recv_counts, send_counts)
        received += recv.numel()
        for (_, i), data in zip(recvs, recv):
            slot = staged.row(layer, layer_moves[i][4] - new_start)
            offset = 0
            for k, n in zip(staged.kinds(), slot_bytes):
                dst = k[layer][slot]
                dst.view(-1).view(torch.uint8).copy_(data[offset : offset + n])
                offset += n
    return received
