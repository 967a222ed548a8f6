"""Paged KV cache bookkeeping: the only owner of which KV blocks are free, who holds which, and the prefix cache.

The cache is `num_blocks` blocks of `block_size` token slots. Token position `pos` of a sequence lives in slot
`block_table[pos // block_size] * block_size + pos % block_size`.

Prefix caching (vLLM v1 style). Once a *full* block's KV is computed, the block is registered under its hash: the
hash of (parent block's hash, the block's token ids), so a hash names the whole prefix up to the block's end. A
sequence admitted later whose first k full blocks have registered hashes takes those blocks (ref count + 1) and
starts with k * block_size computed tokens. Shared blocks are never written: a sequence only writes from its
num_computed_tokens on, which is past every block it took from the cache.

Free list = LRU eviction order. A block whose ref count drops to 0 goes to the free list but keeps its hash, so it
can still be hit; it is evicted (hash dropped) only when `allocate` pops it for new content. Blocks without a hash
go to the front (taken first); a freed sequence's cached blocks go to the back, last block first, so the most
specific block of a prefix is evicted before its parents.

Invariants: ref_counts[b] == number of live block tables holding b; b is in the free list iff ref_counts[b] == 0;
`_cached[h] == b` iff `_hash_of[b] == h`.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from hashlib import blake2b

from eep_hpc.engine.sequence import Sequence


def block_hash(parent: bytes | None, token_ids: list[int]) -> bytes:
    """128-bit hash of a full block chained with its parent's hash (None for the first block)."""
    h = blake2b(parent or b"", digest_size=16)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need num_blocks > 0 and block_size > 0, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks  # [num_blocks]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = evicted first
        self._hash_of: list[bytes | None] = [None] * num_blocks  # [num_blocks]
        self._cached: dict[bytes, int] = {}  # hash -> block holding that prefix's KV
        self.num_queried_tokens = 0  # since start: tokens of admitted sequences looked up in the cache
        self.num_hit_tokens = 0  # of which found

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

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

    # ---- prefix cache ---------------------------------------------------------------------------------------

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the KV of seq's longest cached prefix of full blocks, leaving at least its last token
        to compute (its logits are needed). Read-only: `allocate(seq, n, prefix)` takes them."""
        if not self.enable_prefix_caching:
            return []
        hashes = self._hashes(seq, (seq.num_tokens - 1) // self.block_size)
        blocks = []
        for h in hashes:
            block = self._cached.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Register seq's full blocks whose KV is computed (call after a step advanced num_computed_tokens)."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if full <= seq.num_cached_blocks:
            return
        hashes = self._hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            block, h = seq.block_table[i], hashes[i]
            if h not in self._cached and self._hash_of[block] is None:
                self._cached[h] = block
                self._hash_of[block] = h
            # else: the same prefix was computed twice at once; the first copy stays the cached one
        seq.num_cached_blocks = full

    def _hashes(self, seq: Sequence, n: int) -> list[bytes]:
        """Hashes of seq's first n full blocks (kept on the sequence: its tokens only ever grow)."""
        hashes, bs = seq.block_hashes, self.block_size
        while len(hashes) < n:
            i = len(hashes)
            hashes.append(block_hash(hashes[-1] if hashes else None, seq.token_slice(i * bs, (i + 1) * bs)))
        return hashes[:n]

    # ---- allocation -----------------------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] = ()) -> bool:
        """Grow seq.block_table to cover `num_tokens` tokens in total; all or nothing (False: nothing taken).

        `prefix` (only for a sequence without blocks): cached blocks from `cached_prefix`, taken first; the
        sequence then has len(prefix) * block_size computed tokens.
        """
        if prefix and seq.block_table:
            raise ValueError(f"{seq.request_id}: a cached prefix is only for a sequence without blocks")
        missing = self.blocks_for(num_tokens) - len(seq.block_table) - len(prefix)
        reviving = sum(1 for b in prefix if self.ref_counts[b] == 0)  # cached blocks now in the free list
        if missing + reviving > len(self._free):
            return False
        for block in prefix:
            if self.ref_counts[block] == 0:
                del self._free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
        if prefix:
            seq.num_computed_tokens = len(prefix) * self.block_size
            seq.num_cached_blocks = len(prefix)
        for _ in range(max(missing, 0)):
            block, _ = self._free.popitem(last=False)
            assert self.ref_counts[block] == 0, f"free block {block} is referenced"
            self._evict(block)
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def note_admitted(self, seq: Sequence, num_hit_tokens: int) -> None:
        """Hit-rate figures: a sequence that looked up the cache was admitted with num_hit_tokens of its tokens
        found there (a preempted sequence counts again when it comes back)."""
        if self.enable_prefix_caching:
            self.num_queried_tokens += seq.num_tokens
            self.num_hit_tokens += num_hit_tokens

    def free(self, seq: Sequence) -> None:
        # Last block first: the most specific blocks of a prefix are evicted before their parents.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, f"block {block} freed twice"
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self._hash_of[block] is None:
                    self._free.move_to_end(block, last=False)  # nothing to keep: reuse first
        seq.block_table.clear()
        seq.num_cached_blocks = 0

    def _evict(self, block: int) -> None:
        h = self._hash_of[block]
        if h is not None:
            del self._cached[h]
            self._hash_of[block] = None

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slot of each token position in [start, end)."""
        bs, table = self.block_size, seq.block_table
        if end > len(table) * bs:
            raise IndexError(f"{seq.request_id}: positions up to {end} but blocks cover {len(table) * bs}")
        return [table[pos // bs] * bs + pos % bs for pos in range(start, end)]
