"""Tile-capacity buckets of the graphed decode step: which capacities exist, which one a step
takes, that their regions stay apart, and that a step through a capacity below its batch gives
the eager forward's logits (static mode: the captured body without capture, Triton under the
interpreter on CPU).
"""

from __future__ import annotations

import pytest
import torch

from services.inference.adapters.pool import AdapterPool
from services.inference.engine.decode_graphs import CAPTURE, STATIC, DecodeGraphs, step_tiles, tile_capacities
from services.inference.engine.graph_layout import ALIGN, GraphLayout
from services.inference.kernels.triton_lora import DEFAULT_BLOCK_M
from services.inference.model.loader import random_model
from tests.inference.test_decode_graphs import (BLOCK, MAX_CONTEXT, adapter, decode_step, eager_logits,
                                                random_cuda_model_and_pool, randomize)

MAX_BATCH = 20  # graph sizes 1, 2, 4, 8, 16, 20: batch 20 has capacities 16 and 20
NUM_BLOCKS = 2 * MAX_BATCH  # decode_step gives sequence i blocks 2i and 2i + 1
SCRATCH = NUM_BLOCKS * BLOCK
ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_capacities_are_powers_of_two_from_16_below_the_batch_then_the_batch():
    assert tile_capacities(1) == [1] and tile_capacities(8) == [8] and tile_capacities(16) == [16]
    assert tile_capacities(17) == [16, 17] and tile_capacities(24) == [16, 24] and tile_capacities(32) == [16, 32]
    assert tile_capacities(40) == [16, 32, 40] and tile_capacities(64) == [16, 32, 64]


def test_the_tile_bound_pools_an_adapter_and_counts_its_tiles():
    one = [adapter(0, 17, [1, 2], 1.0, ALL)]
    assert step_tiles(one, DEFAULT_BLOCK_M) == 2  # 17 rows: a full tile and one more
    # The same adapter in two groups (pages and scale equal) pools its rows, as tile_segments does.
    split = [adapter(0, 8, [1, 2], 1.0, ALL), adapter(10, 18, [1, 2], 1.0, ALL)]
    assert step_tiles(split, DEFAULT_BLOCK_M) == 1
    distinct = [adapter(i, i + 1, [i], 1.0, ALL) for i in range(5)] + [adapter(5, 6, [1], 2.0, {"q_proj"})]
    assert step_tiles(distinct, DEFAULT_BLOCK_M) == 6  # another scale is another adapter
    assert step_tiles([], DEFAULT_BLOCK_M) == 0


def test_layout_regions_with_a_capacity_are_disjoint_and_sized_by_it():
    layout = GraphLayout(20, 10, ("q_proj", "v_proj"), 16, 32, tile_capacity=16)
    regions = [layout.token_ids, layout.positions, layout.slots, layout.context_lens, layout.block_tables,
               *layout.tile_rows.values(), *layout.tile_pages.values(), *layout.tile_sizes.values(),
               *layout.tile_scales.values()]
    assert [r.length for r in regions[:5]] == [20, 20, 20, 20, 200]  # the batch's rows, whatever the capacity
    assert layout.tile_rows["q_proj"].length == 16 * 16 and layout.tile_pages["v_proj"].length == 16 * 32
    assert layout.tile_sizes["q_proj"].length == 16 and layout.tile_scales["v_proj"].length == 16
    ordered = sorted(regions, key=lambda r: r.start)
    assert all(a.stop <= b.start for a, b in zip(ordered, ordered[1:]))
    assert all(r.start % ALIGN == 0 for r in regions) and ordered[-1].stop <= layout.size
    full = GraphLayout(20, 10, ("q_proj", "v_proj"), 16, 32)
    assert full.tile_capacity == 20 and full.key == (20, 32, 20) and layout.key == (20, 32, 16)
    assert layout.size < full.size  # so every capacity fits the buffer sized for the largest variant
    base = GraphLayout(20, 10, ("q_proj",), 16, None, tile_capacity=16)
    assert base.key == (20, None, 0) and base.tile_rows == {}  # base-only: no tiles whatever asked
    with pytest.raises(ValueError, match="tile_capacity must be >= 1"):
        GraphLayout(20, 10, ("q_proj",), 16, 16, tile_capacity=0)


@pytest.fixture
def bucketed(tiny_model_dir, triton_device) -> DecodeGraphs:
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device=triton_device)
    pool = AdapterPool(args, 64, device=triton_device)
    for layer in model.attention_layers():
        layer.k_cache = torch.zeros(NUM_BLOCKS + 1, BLOCK, args.num_kv_heads, args.head_dim, device=triton_device)
        layer.v_cache = torch.zeros_like(layer.k_cache)
    return DecodeGraphs(model, pool, mode=STATIC, max_batch=MAX_BATCH, max_rank=16, max_context=MAX_CONTEXT,
                        block_size=BLOCK, scratch_slot=SCRATCH, device=torch.device(triton_device))


def test_variants_cover_every_capacity_and_count_74_at_batch_64(bucketed):
    assert set(bucketed.variants) == ({(b, None, 0) for b in (1, 2, 4, 8, 16, 20)}
                                      | {(b, 16, b) for b in (1, 2, 4, 8, 16, 20)} | {(20, 16, 16)})
    for (batch, block_r, capacity), step in bucketed.variants.items():
        assert step.layout.key == (batch, block_r, capacity)
        if block_r is not None:
            assert all(plan.num_tiles == capacity and plan.num_tokens == batch
                       for plan in step.context.lora.plans.values())
    large = DecodeGraphs(bucketed.model, bucketed.pool, mode=STATIC, max_batch=64, max_rank=64,
                         max_context=MAX_CONTEXT, block_size=BLOCK, scratch_slot=SCRATCH, device=bucketed.device)
    assert len(large.variants) == 74  # the module docstring's count (44 before the buckets)
    assert large.buffer.numel() == max(step.layout.size for step in large.variants.values())


def test_a_step_takes_the_smallest_capacity_that_holds_its_tiles(bucketed):
    few = decode_step(17, [adapter(0, 9, [1, 2], 1.0, ALL), adapter(9, 17, [3, 4, 5], 0.5, ALL)])
    assert bucketed.choose(few).layout.key == (20, 16, 16)  # 2 tiles
    one_big = decode_step(17, [adapter(0, 17, [1, 2], 1.0, ALL)])
    assert bucketed.choose(one_big).layout.key == (20, 16, 16)  # 17 rows of one adapter: 2 tiles
    many = decode_step(17, [adapter(i, i + 1, [i], 1.0, ALL) for i in range(17)])
    assert bucketed.choose(many).layout.key == (20, 16, 20)  # 17 tiles: only the batch's capacity holds them
    exactly = decode_step(17, [adapter(i, i + 1, [i], 1.0, ALL) for i in range(15)]
                          + [adapter(15, 17, [15], 1.0, ALL)])
    assert bucketed.choose(exactly).layout.key == (20, 16, 16)  # 16 tiles fill the small capacity
    assert bucketed.choose(decode_step(17)).layout.key == (20, None, 0)  # no adapter: base-only
    assert bucketed.choose(decode_step(3, [adapter(0, 3, [1], 1.0, ALL)])).layout.key == (4, 16, 4)


def test_a_step_through_a_capacity_below_its_batch_gives_the_eager_logits(bucketed):
    """17 decodes over three adapters (5 tiles for q_proj, fewer for the others) through the
    batch-20 graph of 16 tiles: the logits of the eager forward of exactly those 17."""
    randomize(bucketed)
    groups = [adapter(0, 7, [3, 4], 0.5, {"q_proj", "v_proj", "down_proj"}),
              adapter(7, 12, [9, 10, 11, 12], 2.0, {"q_proj", "gate_proj"}),
              adapter(12, 17, [20, 21, 22], 1.5, ALL)]
    packed = decode_step(17, groups)
    step = bucketed.choose(packed)
    assert step.layout.key == (20, 16, 16)
    graphed = bucketed.run(step, packed).clone()
    plans = step.context.lora.plans
    assert plans["q_proj"].tile_sizes.tolist() == [7, 5, 5] + [0] * 13
    assert plans["k_proj"].tile_sizes.tolist() == [5] + [0] * 15  # only the third adapter targets it
    assert bucketed.replays == {(20, 16, 16): 1}
    torch.testing.assert_close(graphed, eager_logits(bucketed, packed), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_captured_small_capacity_graphs_replay_what_the_static_body_computes(tiny_model_dir):
    model, pool = random_cuda_model_and_pool(tiny_model_dir, NUM_BLOCKS)
    kwargs = dict(max_batch=MAX_BATCH, max_rank=16, max_context=MAX_CONTEXT, block_size=BLOCK, scratch_slot=SCRATCH,
                  device=torch.device("cuda"))
    captured = DecodeGraphs(model, pool, mode=CAPTURE, **kwargs)
    captured.capture()
    static = DecodeGraphs(model, pool, mode=STATIC, **kwargs)
    for packed, key in ((decode_step(17, [adapter(0, 9, [1, 2], 0.5, ALL), adapter(9, 17, [3, 4, 5], 1.5, ALL)]),
                         (20, 16, 16)),
                        (decode_step(17, [adapter(i, i + 1, [i], 1.0, ALL) for i in range(17)]), (20, 16, 20))):
        step = captured.choose(packed)
        assert step.layout.key == key and step.graph is not None
        replayed = captured.run(step, packed).clone()
        torch.testing.assert_close(replayed, static.run(static.choose(packed), packed), rtol=2e-2, atol=2e-2)
