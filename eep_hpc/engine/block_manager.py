"""Paged KV cache bookkeeping: the only owner of which KV blocks are free and which sequence holds which.

The cache is `num_blocks` blocks of `block_size` token slots. Token position `pos` of a sequence lives in slot
`block_table[pos // block_size] * block_size + pos % block_size`.

Every block has a reference count (1 while one sequence holds it) so that prefix caching can later share full
blocks between sequences: a block returns to the free list only when its count drops to 0.
"""

from __future__ import annotations

from collections import deque

from eep_hpc.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks  # [num_blocks]
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.block_table) <= len(self._free)

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow seq.block_table to cover `num_tokens` tokens in total; all or nothing (False: nothing taken)."""
        missing = self.blocks_for(num_tokens) - len(seq.block_table)
        if missing > len(self._free):
            return False
        for _ in range(missing):
            block = self._free.popleft()
            assert self.ref_counts[block] == 0, f"free block {block} is referenced"
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def free(self, seq: Sequence) -> None:
        # Last block first: with prefix caching, the most specific blocks should be evicted first.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self._free.append(block)
        seq.block_table.clear()

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slot of each token position in [start, end)."""
        bs, table = self.block_size, seq.block_table
        if end > len(table) * bs:
            raise IndexError(f"{seq.request_id}: positions up to {end} but blocks cover {len(table) * bs}")
        return [table[pos // bs] * bs + pos % bs for pos in range(start, end)]
