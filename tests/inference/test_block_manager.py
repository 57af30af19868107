"""BlockManager: allocation covers the tokens asked for, free returns everything, slots map."""

from __future__ import annotations

import pytest

from services.inference.engine.block_manager import BlockManager
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.sequence import Sequence


def make_seq(seq_id: int, num_prompt_tokens: int, block_size: int = 4) -> Sequence:
    return Sequence(seq_id, list(range(num_prompt_tokens)), SamplingParams(), block_size=block_size)


def test_allocate_covers_requested_tokens_in_whole_blocks():
    manager = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, 10)
    assert manager.can_allocate(seq, 10)
    manager.allocate(seq, 6)  # a first prefill chunk
    assert len(seq.block_table) == 2 and manager.num_used_blocks == 2
    manager.allocate(seq, 10)  # the rest
    assert len(seq.block_table) == 3 == seq.num_blocks
    manager.allocate(seq, 12)  # decode slots inside the last block need nothing new
    assert len(seq.block_table) == 3
    manager.allocate(seq, 13)
    assert len(seq.block_table) == 4
    assert manager.num_free_blocks == 4 and manager.num_used_blocks == 4


def test_blocks_are_private_and_free_returns_them_all():
    manager = BlockManager(num_blocks=6, block_size=4)
    first, second = make_seq(0, 8), make_seq(1, 12)
    manager.allocate(first, 8)
    manager.allocate(second, 12)
    assert not set(first.block_table) & set(second.block_table)
    first.num_cached_tokens = 8
    manager.free(first)
    assert first.block_table == [] and first.num_cached_tokens == 0
    assert manager.num_free_blocks == 3
    manager.free(second)
    assert manager.num_free_blocks == 6 and manager.num_used_blocks == 0


def test_allocation_beyond_capacity_is_refused_and_raises():
    manager = BlockManager(num_blocks=2, block_size=4)
    seq = make_seq(0, 9)
    assert not manager.can_allocate(seq, 9)
    with pytest.raises(RuntimeError, match="KV cache exhausted"):
        manager.allocate(seq, 9)
    assert manager.num_free_blocks == 2 and seq.block_table == []
    assert manager.num_tokens_fitting(seq) == 8


def test_slot_maps_position_through_the_block_table():
    manager = BlockManager(num_blocks=4, block_size=4)
    filler, seq = make_seq(0, 4), make_seq(1, 7)
    manager.allocate(filler, 4)  # takes block 0
    manager.allocate(seq, 7)  # blocks 1, 2
    assert seq.block_table == [1, 2]
    assert [manager.slot(seq, p) for p in range(7)] == [4, 5, 6, 7, 8, 9, 10]
    manager.free(filler)
    manager.allocate(seq, 9)  # the freed block 0 comes back after the never-used block 3
    assert seq.block_table == [1, 2, 3]
    assert manager.slot(seq, 8) == 12


def test_invalid_geometry_is_rejected():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0, block_size=4)
