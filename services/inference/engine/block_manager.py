"""Paged KV cache bookkeeping: which physical blocks hold which sequence's KV."""

from __future__ import annotations

from collections import deque

from services.inference.engine.sequence import Sequence


class BlockManager:
    """Allocates fixed-size KV blocks from a free list; a sequence's block_table maps its
    logical block i (tokens [i*block_size, (i+1)*block_size)) to a physical block id.

    No prefix caching: blocks are private to one sequence. Allocating past capacity is a
    scheduler bug, so it raises RuntimeError rather than returning a status.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_blocks)

    def num_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that seq.block_table covers its first num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def num_tokens_fitting(self, seq: Sequence) -> int:
        """How many of seq's tokens the cache could hold now: its blocks plus every free one."""
        return (len(seq.block_table) + len(self._free_blocks)) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_tokens) <= len(self._free_blocks)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table to cover tokens [0, num_tokens): a prefill chunk or one decode slot."""
        needed = self.num_blocks_needed(seq, num_tokens)
        if needed > len(self._free_blocks):
            raise RuntimeError(f"KV cache exhausted: {seq!r} needs {needed} blocks, "
                               f"{len(self._free_blocks)} free (check can_allocate first)")
        seq.block_table.extend(self._free_blocks.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks; its KV is gone, so nothing of it is cached any more."""
        self._free_blocks.extend(seq.block_table)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat KV slot index of token `position` of seq."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
