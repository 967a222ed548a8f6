"""Expert weights from the old placement into staging for the new one, peer to peer over the transfer group.

Every participant knows the whole move list (plan_moves), so send and receive counts need no exchange: rank p sends,
per MoE layer, one row per move whose source is p and destination another rank, ordered by (destination, move
order); it receives rows in (source, move order). A row is one expert: w13 [2I, D] and w2 [D, I] flattened.
Slots of the new placement that no move touches keep what the same rank held at the same local index.
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


def transfer_experts(
    group: EpochGroup,
    participants: list[int],
    my_id: int,
    moves: list[list[int]],  # [layer, logical, src_id, dst_id, dst_global_slot]
    old_local: list[list[int]] | None,  # old_local[layer][k] = logical expert in my old local slot k (None: joining)
    old_w13: list[torch.Tensor] | None,
    old_w2: list[torch.Tensor] | None,
    new_start: int,
    new_end: int,  # my global slot range in the new placement (empty for a departing rank)
    num_layers: int,
    shape: tuple[int, int],  # (I, D)
    dtype: torch.dtype,
    device: torch.device,
) -> StagedExperts:
    I, D = shape
    row = 3 * I * D
    pos = {rid: i for i, rid in enumerate(participants)}
    by_layer: list[list[list[int]]] = [[] for _ in range(num_layers)]
    for m in moves:
        by_layer[m[0]].append(m)
    n_new = new_end - new_start
    staged_w13, staged_w2, received = [], [], 0
    for layer in range(num_layers):
        w13 = torch.empty(n_new, 2 * I, D, dtype=dtype, device=device)
        w2 = torch.empty(n_new, D, I, dtype=dtype, device=device)
        moved_here = {m[4] for m in by_layer[layer] if m[3] == my_id}
        if old_w13 is not None:  # untouched slots keep their expert (same rank, same local index)
            for g in range(new_start, new_end):
                if g not in moved_here:
                    w13[g - new_start] = old_w13[layer][g - new_start]
                    w2[g - new_start] = old_w2[layer][g - new_start]

        def old_row(logical: int) -> torch.Tensor:
            k = old_local[layer].index(logical)
            return torch.cat([old_w13[layer][k].reshape(-1), old_w2[layer][k].reshape(-1)])

        sends = sorted((pos[m[3]], i) for i, m in enumerate(by_layer[layer]) if m[2] == my_id and m[3] != my_id)
        recvs = sorted((pos[m[2]], i) for i, m in enumerate(by_layer[layer]) if m[3] == my_id and m[2] != my_id)
        send_counts = [0] * group.size
        recv_counts = [0] * group.size
        for p, _ in sends:
            send_counts[p] += 1
        for p, _ in recvs:
            recv_counts[p] += 1
        send = torch.stack([old_row(by_layer[layer][i][1]) for _, i in sends]) if sends else torch.empty(0, row, dtype=dtype, device=device)
        recv = torch.empty(len(recvs), row, dtype=dtype, device=device)
        if group.size > 1:
            group.all_to_all(recv, send, recv_counts, send_counts)
        received += recv.numel() * recv.element_size()
        for (_, i), data in zip(recvs, recv):
            slot = by_layer[layer][i][4] - new_start
            w13[slot] = data[: 2 * I * D].view(2 * I, D)
            w2[slot] = data[2 * I * D :].view(D, I)
        for m in by_layer[layer]:  # local copies: the expert sat in another of my old slots
            if m[2] == my_id and m[3] == my_id:
                data = old_row(m[1])
                w13[m[4] - new_start] = data[: 2 * I * D].view(2 * I, D)
                w2[m[4] - new_start] = data[2 * I * D :].view(D, I)
        staged_w13.append(w13)
        staged_w2.append(w2)
    return StagedExperts(staged_w13, staged_w2, received)
