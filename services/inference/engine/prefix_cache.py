"""Automatic prefix caching: content hashes of full KV blocks, and the blocks kept by hash.

A full block's KV is a function of every token up to its end, of the adapter whose k/v
projections produced it (its id *and* bytes: a replaced adapter keeps its id), and nothing
else. So a block is named by a hash chained over the previous block's hash and its own token
ids, rooted in (cache scope, adapter key, adapter sha256). The scope is there for isolation,
not correctness: a hit shortens time to first token, which would tell one tenant that another
sent the same prefix, so requests only share within a scope (the router sets the tenant id).

SHA-256, not Python's hash(): a collision would hand one request another's KV.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections import OrderedDict
from collections.abc import Sequence


def prefix_identity(scope: str, adapter_key: str | None, adapter_sha256: str) -> bytes:
    """The root of a sequence's chain: what, besides its tokens, its KV depends on or is
    scoped by. JSON keeps the three fields apart (no separator can be forged into them)."""
    return hashlib.sha256(json.dumps([scope, adapter_key, adapter_sha256]).encode()).digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """parent is 32 bytes and every block has block_size tokens, so the input is unambiguous."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class BlockHashes:
    """The chained hashes of one sequence's leading full blocks under one identity, computed
    as far as asked and kept: a sequence waiting at the head of a queue is matched every step."""

    def __init__(self, identity: bytes) -> None:
        self.identity = identity
        self._hashes: list[bytes] = []

    def upto(self, token_ids: Sequence[int], num_blocks: int, block_size: int) -> list[bytes]:
        """The hashes of blocks [0, num_blocks) at least (more if computed before; the list is
        kept, not copied: read it, do not change it). token_ids must cover those blocks."""
        while len(self._hashes) < num_blocks:
            start = len(self._hashes) * block_size
            parent = self._hashes[-1] if self._hashes else self.identity
            self._hashes.append(block_hash(parent, token_ids[start:start + block_size]))
        return self._hashes


class PrefixCache:
    """Which physical block holds the KV of which block hash, and which of those blocks no
    sequence holds any more (evictable, least recently released first).

    Reference counts live in the BlockManager; this only knows hashes. A block is published
    once its KV is written and never written again while it has a hash: only a block taken
    from here by `evict_oldest` is handed out for new tokens, and that drops its hash first.
    """

    def __init__(self) -> None:
        self._block_of: dict[bytes, int] = {}
        self._hash_of: dict[int, bytes] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def holds(self, block: int) -> bool:
        return block in self._hash_of

    def longest_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Blocks holding hashes[0], hashes[1], ... up to the first hash not cached."""
        blocks = []
        for digest in hashes:
            block = self._block_of.get(digest)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def publish(self, block: int, digest: bytes) -> None:
        """Names a written block by its hash. A hash already held by another block (two
        sequences computed the same prefix at once) keeps that block: this one stays private."""
        if digest not in self._block_of and block not in self._hash_of:
            self._block_of[digest] = block
            self._hash_of[block] = digest

    def release(self, block: int) -> None:
        """The last sequence holding this cached block let go: it may be evicted from now on."""
        self._evictable[block] = None

    def reuse(self, block: int) -> None:
        """A released block is shared again: no longer evictable."""
        del self._evictable[block]

    def evict_oldest(self) -> int:
        """Forgets the least recently released block's hash and returns the block, to be written."""
        block, _ = self._evictable.popitem(last=False)
        del self._block_of[self._hash_of.pop(block)]
        return block
