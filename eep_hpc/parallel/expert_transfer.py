"""Expert weights from the old placement into staging for the new one.

Each move is [layer, logical, src_rank_id, dst_rank_id, dst_global_slot, src_local_slot]. A rank builds its new
slot tensors from: slots no move touches (they keep what the same rank held at the same local index), local copies
(src == dst: the expert sat in another of its old slots), and remote copies, which arrive either by NIXL READs from
the source's published slots (no collective: a dead peer fails only its reader) or, without NIXL, by an all-to-all
over a transfer group of all participants. For the all-to-all every participant knows the move list, so counts need
no exchange: rank p sends, per layer, one row per move it sources for another rank, ordered by (destination
position, move order), and receives rows in (source position, move order). A row is one expert: w13 [2I, D] and
w2 [D, I] flattened.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eep_hpc.parallel.groups import EpochGroup


@dataclass
class StagedExperts:
    w13: list[torch.Tensor]  # per MoE layer [S_new_local, 2I, D]
    w2: list[torch.Tensor]  # per MoE layer [S_new_local, D, I]
    bytes_received: int


@dataclass
class SlotTensors:
    """This rank's old expert slots (None for a joining rank)."""

    w13: list[torch.Tensor]
    w2: list[torch.Tensor]


def stage_experts(my_id: int, moves: list[list[int]], old: SlotTensors | None, new_start: int, new_end: int,
                  num_layers: int, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> tuple[StagedExperts, list]:
    """New slot tensors with untouched slots and local copies filled in -> (staged, remote moves still to fetch)."""
    I, D = shape
    n_new = new_end - new_start
    w13s, w2s, remote = [], [], []
    for layer in range(num_layers):
        w13 = torch.empty(n_new, 2 * I, D, dtype=dtype, device=device)
        w2 = torch.empty(n_new, D, I, dtype=dtype, device=device)
        moved_here = {m[4] for m in moves if m[0] == layer and m[3] == my_id}
        if old is not None:
            for g in range(new_start, new_end):
                if g not in moved_here:
                    w13[g - new_start] = old.w13[layer][g - new_start]
                    w2[g - new_start] = old.w2[layer][g - new_start]
        for m in moves:
            if m[0] != layer or m[3] != my_id:
                continue
            if m[2] == my_id:
                w13[m[4] - new_start] = old.w13[layer][m[5]]
                w2[m[4] - new_start] = old.w2[layer][m[5]]
            else:
                remote.append(m)
        w13s.append(w13)
        w2s.append(w2)
    return StagedExperts(w13s, w2s, 0), remote


def fetch_over_nixl(agent, source_epoch: int, staged: StagedExperts, remote: list[list[int]], new_start: int):
    """Remote copies by NIXL READs into the staging tensors -> (bytes, their registration). The registration is
    kept: after the commit the staging tensors are what this rank serves to peers."""
    reg = agent.register(staged.w13 + staged.w2) if staged.w13 and staged.w13[0].shape[0] else None
    try:
        reads = [(m[2], m[0], m[5], staged.w13[m[0]][m[4] - new_start], staged.w2[m[0]][m[4] - new_start]) for m in remote]
        return agent.fetch_experts(source_epoch, reads), reg
    except BaseException:
        if reg is not None:
            agent.deregister(reg)
        raise


def exchange_over_group(group: EpochGroup, participants: list[int], my_id: int, moves: list[list[int]],
                        old: SlotTensors | None, staged: StagedExperts, new_start: int, num_layers: int,
                        shape: tuple[int, int]) -> int:
    I, D = shape
    pos = {rid: i for i, rid in enumerate(participants)}
    dtype, device = staged.w13[0].dtype, staged.w13[0].device
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
        rows = [torch.cat([old.w13[layer][layer_moves[i][5]].reshape(-1), old.w2[layer][layer_moves[i][5]].reshape(-1)])
                for _, i in sends]
        send = torch.stack(rows) if rows else torch.empty(0, 3 * I * D, dtype=dtype, device=device)
        recv = torch.empty(len(recvs), 3 * I * D, dtype=dtype, device=device)
        group.all_to_all(recv, send, recv_counts, send_counts)
        received += recv.numel() * recv.element_size()
        for (_, i), data in zip(recvs, recv):
            slot = layer_moves[i][4] - new_start
            staged.w13[layer][slot] = data[: 2 * I * D].view(2 * I, D)
            staged.w2[layer][slot] = data[2 * I * D :].view(D, I)
    return received
