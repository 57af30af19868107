"""Paged KV cache bookkeeping: which physical blocks hold which sequence's KV, and (with
prefix caching) which full blocks several sequences share.

With prefix caching, a sequence's full blocks are published under a content hash
(prefix_cache.py) once their KV is written, prompt and generated tokens alike: a multi-turn
chat resends the previous reply as part of its next prompt, and a preempted sequence resumes
from its own blocks if they were not evicted meanwhile (a token's KV depends only on the
tokens before it, which the hash covers, whichever step computed it). An admitted sequence
shares the longest run of its leading full blocks found there and computes only the rest.
A shared block is never written: only full blocks are published, a sequence writes only
past its cached tokens, and a block is handed out for new tokens only once no sequence holds
it, losing its hash first. Released cached blocks stay cached until their memory is needed
and count as free meanwhile; an admission whose shared prefix would take more free blocks
than starting afresh (the shared blocks were released, the chunk is budget-bound) starts
afresh. So keeping prefixes never makes an admission wait, nor a sequence be preempted, where
private blocks would have let it run.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.inference.engine.prefix_cache import BlockHashes, PrefixCache, prefix_identity
from services.inference.engine.sequence import Sequence


@dataclass(frozen=True)
class AdmissionPlan:
    """How a waiting sequence starts: tokens [0, len(shared_blocks) * block_size) are read
    from shared blocks, the next num_new_tokens are computed in its first step."""

    shared_blocks: tuple[int, ...]
    num_new_tokens: int


class BlockManager:
    """Allocates fixed-size KV blocks; a sequence's block_table maps its logical block i
    (tokens [i*block_size, (i+1)*block_size)) to a physical block id.

    Without prefix caching, blocks are private to one sequence, exactly as before it existed.
    Allocating past capacity is a scheduler bug, so it raises RuntimeError rather than
    returning a status.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free_blocks: deque[int] = deque(range(num_blocks))  # holding nothing worth keeping
        self._ref_counts = [0] * num_blocks  # sequences holding each block
        self._cache = PrefixCache() if prefix_caching else None
        # Tokens of admitted sequences (a preempted one's again when it resumes) read from
        # shared blocks, and those left to compute: the prefix cache's hit rate.
        self.prompt_tokens_cached = 0
        self.prompt_tokens_computed = 0

    @property
    def prefix_caching(self) -> bool:
        return self._cache is not None

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: free ones and cached ones no sequence holds."""
        return len(self._free_blocks) + self.num_cached_free_blocks

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold a cached prefix (evicted least recently used first)."""
        return self._cache.num_evictable if self._cache is not None else 0

    @property
    def num_used_blocks(self) -> int:
        """Blocks held by sequences (a shared one counts once)."""
        return self.num_blocks - self.num_free_blocks

    def num_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks to add so that seq.block_table covers its first num_tokens tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(seq.block_table))

    def num_tokens_fitting(self, seq: Sequence) -> int:
        """How many of seq's tokens the cache could hold now: its blocks plus every free one."""
        return (len(seq.block_table) + self.num_free_blocks) * self.block_size

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq.block_table to cover tokens [0, num_tokens): a prefill chunk or one decode slot."""
        needed = self.num_blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"KV cache exhausted: {seq!r} needs {needed} blocks, "
                               f"{self.num_free_blocks} free (check can_allocate first)")
        seq.block_table.extend(self._take_free_block() for _ in range(needed))

    def plan_admission(self, seq: Sequence, budget: int, adapter_sha256: str | None) -> AdmissionPlan | None:
        """The start of seq (holding no blocks) with at most `budget` tokens computed: after
        its longest cached prefix when that fits, else from token 0 (exactly what runs
        without caching); None when neither fits. adapter_sha256: the bytes of the adapter
        it runs with ("" for the base model), None when not known yet (no sharing then)."""
        shared = self._cached_prefix(seq, adapter_sha256)
        if shared:
            plan = AdmissionPlan(tuple(shared), min(seq.num_tokens - len(shared) * self.block_size, budget))
            if self._fits(plan):
                return plan
        return self.plan_fresh_start(seq, budget)

    def plan_fresh_start(self, seq: Sequence, budget: int) -> AdmissionPlan | None:
        """The start of seq from token 0 with at most `budget` tokens computed, None when it
        does not fit. Looks nothing up in the prefix cache (plan_admission walks one entry per
        cached block), so it is cheap enough to ask for every waiting sequence every step."""
        plan = AdmissionPlan((), min(seq.num_tokens, budget))
        return plan if self._fits(plan) else None

    def admit(self, seq: Sequence, plan: AdmissionPlan, adapter_sha256: str | None) -> None:
        """Starts seq as planned; adapter_sha256: the bytes it was admitted with, which name
        the blocks it will publish."""
        if seq.block_table:
            raise RuntimeError(f"{seq!r} is admitted while holding KV blocks")
        if self._cache is not None:
            if adapter_sha256 is None:
                raise RuntimeError(f"{seq!r} is admitted before the adapter bytes it runs with are known")
            planned_with = seq.block_hashes
            if self._hashes_for(seq, adapter_sha256) is not planned_with and plan.shared_blocks:
                raise RuntimeError(f"{seq!r} was planned for other adapter bytes than it was admitted with")
        for block in plan.shared_blocks:
            if self._ref_counts[block] == 0:
                self._cache.reuse(block)
            self._ref_counts[block] += 1
        seq.block_table = list(plan.shared_blocks)
        seq.num_published_blocks = len(plan.shared_blocks)
        seq.num_cached_tokens = len(plan.shared_blocks) * self.block_size
        if seq.num_completion_tokens == 0:  # the admission whose prefill yields the first token
            # A prefill resumed after a preemption reads back blocks it wrote itself: its own
            # work, not a hit (usage bills cached tokens apart). The fewest tokens any of its
            # admissions read is what it never computed.
            resumed = seq.num_preemptions > 0
            seq.num_cached_prompt_tokens = (min(seq.num_cached_prompt_tokens, seq.num_cached_tokens) if resumed
                                            else seq.num_cached_tokens)
        self.prompt_tokens_cached += seq.num_cached_tokens
        self.prompt_tokens_computed += seq.num_uncached_tokens
        self.allocate(seq, seq.num_cached_tokens + plan.num_new_tokens)

    def publish_written_blocks(self, seq: Sequence) -> None:
        """Publishes seq's blocks that are full of written KV: call once the step that
        computed its tokens up to num_cached_tokens has run."""
        num_full = seq.num_cached_tokens // self.block_size
        if self._cache is None or seq.block_hashes is None or num_full <= seq.num_published_blocks:
            return
        hashes = seq.block_hashes.upto(seq.token_ids, num_full, self.block_size)
        for i in range(seq.num_published_blocks, num_full):
            self._cache.publish(seq.block_table[i], hashes[i])
        seq.num_published_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Let go of all of seq's blocks. Those no other sequence holds become free, and
        cached ones stay findable until their memory is needed."""
        released = []
        for block in seq.block_table:
            self._ref_counts[block] -= 1
            if self._ref_counts[block] == 0:
                released.append(block)
        cached = self._cache.holds if self._cache is not None else lambda block: False
        self._free_blocks.extend(block for block in released if not cached(block))
        # The tail first: a block is only found through every block before it, so a prefix's
        # tail is the least likely to be hit and goes first.
        for block in reversed(released):
            if cached(block):
                self._cache.release(block)
        seq.block_table = []
        seq.num_cached_tokens = 0
        seq.num_published_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        """Flat KV slot index of token `position` of seq."""
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

    def _cached_prefix(self, seq: Sequence, adapter_sha256: str | None) -> list[int]:
        """Blocks holding seq's longest cached run of leading full blocks, never all its
        tokens: the last one is computed, as its logits give the next token."""
        if self._cache is None or adapter_sha256 is None:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hashes = self._hashes_for(seq, adapter_sha256).upto(seq.token_ids, max_blocks, self.block_size)
        return self._cache.longest_prefix(hashes[:max_blocks])

    @staticmethod
    def _hashes_for(seq: Sequence, adapter_sha256: str) -> BlockHashes:
        """seq's block hashes under its scope and these adapter bytes: kept while they stay
        the same, started again when the adapter's bytes changed (replaced while preempted)."""
        identity = prefix_identity(seq.cache_scope, seq.adapter_key, adapter_sha256)
        if seq.block_hashes is None or seq.block_hashes.identity != identity:
            seq.block_hashes = BlockHashes(identity)
        return seq.block_hashes

    def _fits(self, plan: AdmissionPlan) -> bool:
        return self._num_free_blocks_taken(plan) <= self.num_free_blocks

    def _num_free_blocks_taken(self, plan: AdmissionPlan) -> int:
        """Free blocks a plan uses: new ones for its chunk, and its shared ones that no
        sequence holds (they count as free until taken)."""
        covered = len(plan.shared_blocks) * self.block_size + plan.num_new_tokens
        revived = sum(1 for block in plan.shared_blocks if self._ref_counts[block] == 0)
        return -(-covered // self.block_size) - len(plan.shared_blocks) + revived

    def _take_free_block(self) -> int:
        # Blocks holding nothing reusable first: a cached prefix is evicted only when none is left.
        block = self._free_blocks.popleft() if self._free_blocks else self._cache.evict_oldest()
        self._ref_counts[block] = 1
        return block
