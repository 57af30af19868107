"""BlockManager with prefix caching: which blocks are shared, with whom, for how long, and
that keeping freed prefixes never leaves less room than private blocks would."""

from __future__ import annotations

import pytest

from services.inference.engine.block_manager import AdmissionPlan, BlockManager
from services.inference.engine.prefix_cache import BlockHashes, prefix_identity
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.sequence import Sequence

BS = 4
PREFIX = list(range(100, 112))  # three full blocks


def make_seq(seq_id: int, tokens, scope: str = "", adapter: str | None = None, sha: str = "") -> Sequence:
    return Sequence(seq_id, list(tokens), SamplingParams(), adapter_key=adapter, block_size=BS, adapter_sha256=sha,
                    cache_scope=scope)


def start(manager: BlockManager, seq: Sequence, budget: int = 1000, sha: str | None = None) -> AdmissionPlan:
    """Admits seq as the scheduler does and runs its first chunk (its KV is then written)."""
    sha = seq.adapter_sha256 if sha is None else sha
    plan = manager.plan_admission(seq, budget, sha)
    assert plan is not None
    manager.admit(seq, plan, sha)
    compute(manager, seq, plan.num_new_tokens)
    return plan


def compute(manager: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """One step computing seq's next num_tokens tokens (allocated first, published after)."""
    manager.allocate(seq, seq.num_cached_tokens + num_tokens)
    seq.num_cached_tokens += num_tokens
    manager.publish_written_blocks(seq)


def shared_tokens(manager: BlockManager, seq: Sequence, sha: str | None = None) -> int:
    plan = manager.plan_admission(seq, 1000, seq.adapter_sha256 if sha is None else sha)
    return len(plan.shared_blocks) * BS


def test_a_shared_prefix_is_read_from_the_blocks_the_first_sequence_wrote():
    manager = BlockManager(16, BS, prefix_caching=True)
    first, second = make_seq(0, PREFIX + [1, 2]), make_seq(1, PREFIX + [5, 6, 7])
    assert start(manager, first).shared_blocks == ()
    plan = start(manager, second)
    assert plan == AdmissionPlan(tuple(first.block_table[:3]), 3)
    assert second.block_table[:3] == first.block_table[:3]
    assert second.block_table[3] != first.block_table[3]  # the partial last block is private
    assert second.num_cached_prompt_tokens == 12 and second.num_cached_tokens == 15
    assert manager.num_used_blocks == 5  # a shared block counts once
    assert (manager.prompt_tokens_cached, manager.prompt_tokens_computed) == (12, 14 + 3)
    manager.free(first)
    assert manager.num_used_blocks == 4  # the second still holds the shared three
    manager.free(second)
    assert manager.num_used_blocks == 0 and manager.num_free_blocks == 16
    assert manager.num_cached_free_blocks == 3  # the full blocks stay findable; partial ones do not


def test_the_last_prompt_token_is_always_computed():
    manager = BlockManager(32, BS, prefix_caching=True)
    for tokens in (PREFIX, PREFIX + [7], PREFIX[:4]):
        start(manager, make_seq(0, tokens))
    # A repeat of a whole-block prompt shares all but its last block: its last token's logits are needed.
    assert shared_tokens(manager, make_seq(1, PREFIX)) == 8
    assert shared_tokens(manager, make_seq(1, PREFIX + [7])) == 12
    assert shared_tokens(manager, make_seq(1, PREFIX[:4])) == 0
    assert shared_tokens(manager, make_seq(1, PREFIX[:5])) == 4


def test_blocks_are_shared_only_once_written_in_full_generated_ones_included():
    manager = BlockManager(16, BS, prefix_caching=True)
    seq = make_seq(0, PREFIX[:10])
    start(manager, seq, budget=6)  # tokens 0..5: one full block written
    assert shared_tokens(manager, make_seq(1, PREFIX)) == 4
    compute(manager, seq, 4)  # the rest of the prompt: two full blocks
    assert shared_tokens(manager, make_seq(1, PREFIX)) == 8
    seq.append_token(110)
    seq.append_token(111)  # generated: PREFIX again, by chance
    compute(manager, seq, 1)  # the first one's KV: the third block is full only after the next step
    assert shared_tokens(manager, make_seq(1, PREFIX + [9])) == 8
    compute(manager, seq, 1)
    assert shared_tokens(manager, make_seq(1, PREFIX + [9])) == 12


def test_scopes_adapters_and_adapter_bytes_each_have_their_own_prefixes():
    manager = BlockManager(64, BS, prefix_caching=True)
    tokens = PREFIX + [1]
    start(manager, make_seq(0, tokens, scope="tenant-a"))
    start(manager, make_seq(1, tokens, scope="tenant-a", adapter="fin", sha="x" * 64))
    assert shared_tokens(manager, make_seq(2, tokens, scope="tenant-a")) == 12
    assert shared_tokens(manager, make_seq(2, tokens, scope="tenant-a", adapter="fin", sha="x" * 64)) == 12
    for other in (make_seq(2, tokens, scope="tenant-b"), make_seq(2, tokens),
                  make_seq(2, tokens, scope="tenant-b", adapter="fin", sha="x" * 64),
                  make_seq(2, tokens, scope="tenant-a", adapter="fin", sha="y" * 64),  # replaced: other bytes
                  make_seq(2, tokens, scope="tenant-a", adapter="legal", sha="x" * 64)):
        assert shared_tokens(manager, other) == 0, other
    # Bytes not known yet (any bytes asked for, none resident): no sharing, and admission
    # must name them before blocks are published under them.
    unsettled = make_seq(2, tokens, scope="tenant-a", adapter="fin")
    assert shared_tokens(manager, unsettled, sha=None) == 0
    with pytest.raises(RuntimeError, match="adapter bytes"):
        manager.admit(unsettled, manager.plan_admission(unsettled, 1000, None), None)


def test_hashes_chain_over_every_earlier_block():
    identity = prefix_identity("", None, "")
    tokens = PREFIX + PREFIX
    hashes = BlockHashes(identity).upto(tokens, 6, BS)
    assert len(set(hashes)) == 6  # equal block contents after different prefixes name other blocks
    assert BlockHashes(identity).upto(tokens, 2, BS) == hashes[:2]
    manager = BlockManager(16, BS, prefix_caching=True)
    start(manager, make_seq(0, PREFIX + [1]))
    assert shared_tokens(manager, make_seq(1, [9, 9, 9, 9] + PREFIX[4:] + [1])) == 0


def test_freed_prefixes_stay_until_their_memory_is_needed_least_recently_freed_first():
    manager = BlockManager(6, BS, prefix_caching=True)
    first, second = make_seq(0, PREFIX[:9]), make_seq(1, list(range(200, 209)))
    start(manager, first)
    manager.free(first)  # its two full blocks are cached, its partial one free
    start(manager, second)
    assert not set(second.block_table) & set(first.block_table[:2])  # never-cached blocks go first
    manager.free(second)
    assert manager.num_cached_free_blocks == 4 and manager.num_free_blocks == 6
    third = make_seq(2, list(range(300, 313)))  # four blocks: two free, then two evicted
    start(manager, third)
    assert manager.num_cached_free_blocks == 2
    manager.free(third)
    assert shared_tokens(manager, make_seq(3, PREFIX[:9])) == 0  # the oldest prefix went
    assert shared_tokens(manager, make_seq(3, list(range(200, 209)))) == 8


def test_a_hit_makes_a_freed_prefix_the_most_recently_used():
    manager = BlockManager(8, BS, prefix_caching=True)
    older, newer = PREFIX[:9], list(range(200, 209))
    for i, tokens in enumerate((older, newer, older)):  # the older prefix is hit, then freed again
        seq = make_seq(i, tokens)
        start(manager, seq)
        manager.free(seq)
    assert manager.prompt_tokens_cached == 8 and manager.num_cached_free_blocks == 4
    third = make_seq(3, list(range(300, 324)))
    start(manager, third)  # six blocks: four free, two evicted
    manager.free(third)
    assert shared_tokens(manager, make_seq(4, older)) == 8
    assert shared_tokens(manager, make_seq(4, newer)) == 0


def test_shared_blocks_are_not_evicted_while_held():
    manager = BlockManager(6, BS, prefix_caching=True)
    first = make_seq(0, PREFIX[:9])
    start(manager, first)
    manager.free(first)
    again = make_seq(1, PREFIX[:9])
    start(manager, again)  # takes the two cached blocks back
    assert again.num_cached_prompt_tokens == 8 and manager.num_cached_free_blocks == 0
    assert manager.num_free_blocks == 3
    assert manager.plan_admission(make_seq(2, list(range(300, 313))), 1000, "") is None  # four blocks


def test_cached_blocks_count_as_free_so_caching_never_refuses_what_private_blocks_allow():
    manager = BlockManager(4, BS, prefix_caching=True)
    first = make_seq(0, PREFIX[:9])
    start(manager, first)
    manager.free(first)
    assert manager.num_free_blocks == 4 and manager.num_cached_free_blocks == 2
    whole = make_seq(1, list(range(300, 316)))
    assert manager.can_allocate(whole, 16)  # every block, evicting the cached prefix
    holder = make_seq(2, [1])
    start(manager, holder)  # one block held: three free, two of them cached
    # Sharing the two cached blocks and computing 8 more tokens would take four blocks; the
    # plan falls back to what runs without caching: 8 tokens in two new blocks.
    longer = make_seq(3, PREFIX[:8] + list(range(400, 408)))
    assert manager.plan_admission(longer, 8, "") == AdmissionPlan((), 8)
    assert manager.plan_admission(longer, 16, "") is None  # four blocks, with or without caching


def test_sharing_blocks_a_running_sequence_holds_admits_what_private_blocks_would_not():
    manager = BlockManager(4, BS, prefix_caching=True)
    start(manager, make_seq(0, PREFIX[:9]))  # three blocks held, one free
    twin = make_seq(1, PREFIX[:8] + [5, 6])
    assert not manager.can_allocate(twin, 10)
    assert manager.plan_admission(twin, 1000, "").shared_blocks != ()
    start(manager, twin)
    assert manager.num_used_blocks == 4


def test_sequences_computing_the_same_prefix_at_once_keep_one_copy():
    manager = BlockManager(16, BS, prefix_caching=True)
    first, second = make_seq(0, PREFIX + [1]), make_seq(1, PREFIX + [2])
    plans = [manager.plan_admission(seq, 1000, "") for seq in (first, second)]
    for seq, plan in zip((first, second), plans):
        manager.admit(seq, plan, "")
    for seq, plan in zip((first, second), plans):
        compute(manager, seq, plan.num_new_tokens)  # both publish; the first copy is kept
    manager.free(second)
    assert manager.num_cached_free_blocks == 0  # the second's copies were private: plainly free
    assert manager.plan_admission(make_seq(2, PREFIX + [3]), 1000, "").shared_blocks == tuple(first.block_table[:3])


def test_a_preempted_sequence_resumes_from_its_own_blocks_unless_its_adapter_changed():
    manager = BlockManager(16, BS, prefix_caching=True)
    seq = make_seq(0, PREFIX + [1], adapter="fin")  # any bytes: the gate says which
    start(manager, seq, sha="x" * 64)
    seq.append_token(7)
    compute(manager, seq, 1)
    manager.free(seq)  # preempted: tokens kept, KV dropped
    assert seq.num_cached_tokens == 0 and seq.block_table == []
    assert shared_tokens(manager, seq, sha="x" * 64) == 12
    assert shared_tokens(manager, seq, sha="y" * 64) == 0  # replaced while it waited
    start(manager, seq, sha="y" * 64)
    assert seq.block_hashes.identity == prefix_identity("", "fin", "y" * 64)
    assert manager.prompt_tokens_cached == 0


def test_without_prefix_caching_blocks_stay_private_as_before():
    manager = BlockManager(8, BS)
    first, second = make_seq(0, PREFIX + [1]), make_seq(1, PREFIX + [1])
    start(manager, first)
    start(manager, second)
    assert not set(first.block_table) & set(second.block_table)
    manager.free(first)
    assert manager.num_cached_free_blocks == 0 and shared_tokens(manager, make_seq(2, PREFIX + [1])) == 0
    assert (manager.prompt_tokens_cached, manager.prompt_tokens_computed) == (0, 26)
