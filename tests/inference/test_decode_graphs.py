"""The graphed decode step: which steps it takes, what its static buffers hold, and (on a GPU)
that a captured graph replays exactly what the same body computes without capture.

Its tokens against HF + peft are checked in test_oracle.py (test_graphed_decode_steps_...).
"""

from __future__ import annotations

import pytest
import torch

from services.inference.adapters.batch import AdapterSegments
from services.inference.adapters.pool import AdapterPool
from services.inference.config import InferenceConfig
from services.inference.engine.decode_graphs import (CAPTURE, OFF, STATIC, DecodeGraphs, graph_batch_sizes,
                                                     resolve_graph_mode)
from services.inference.engine.graph_layout import ALIGN, GraphLayout
from services.inference.engine.packed_step import PackedStep
from services.inference.kernels.reference import Segment
from services.inference.kernels.triton_lora import rank_paddings
from services.inference.model.loader import random_model

BLOCK = 4
MAX_CONTEXT = 64
NUM_BLOCKS = 32
SCRATCH = NUM_BLOCKS * BLOCK


def test_auto_graphs_only_on_cuda_with_triton_kernels(tmp_path):
    assert resolve_graph_mode("auto", "cpu", "triton") == OFF
    assert resolve_graph_mode("auto", "cuda", "torch") == OFF
    assert resolve_graph_mode("auto", "cuda:1", "triton") == CAPTURE
    assert resolve_graph_mode("on", "cuda", "triton") == CAPTURE
    assert resolve_graph_mode("static", "cpu", "triton") == STATIC
    assert resolve_graph_mode("off", "cuda", "triton") == OFF


@pytest.mark.parametrize("mode, device, kernels, message", [
    ("on", "cuda", "torch", "needs --kernels triton"),
    ("static", "cpu", "torch", "needs --kernels triton"),
    ("on", "cpu", "triton", "needs a CUDA device"),
    ("always", "cuda", "triton", "must be one of auto, on, off, static"),
])
def test_graph_modes_that_cannot_run_are_refused(mode, device, kernels, message):
    with pytest.raises(ValueError, match=message):
        resolve_graph_mode(mode, device, kernels)


def test_config_refuses_unknown_graph_settings(tmp_path):
    with pytest.raises(ValueError, match="--cuda-graphs must be one of"):
        InferenceConfig(base_model=tmp_path, cuda_graphs="yes")
    with pytest.raises(ValueError, match="--max-graph-batch must be >= 1"):
        InferenceConfig(base_model=tmp_path, max_graph_batch=0)


def test_batch_sizes_and_rank_paddings():
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert graph_batch_sizes(5) == [1, 2, 4, 5]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert rank_paddings(64) == [16, 32, 64]
    assert rank_paddings(8) == [16]
    assert rank_paddings(33) == [16, 32, 64]


def test_layout_regions_are_disjoint_and_aligned():
    layout = GraphLayout(6, 10, ("q_proj", "v_proj"), 16, 32)
    regions = [layout.token_ids, layout.positions, layout.slots, layout.context_lens, layout.block_tables,
               *layout.tile_rows.values(), *layout.tile_pages.values(), *layout.tile_sizes.values(),
               *layout.tile_scales.values()]
    assert [r.length for r in regions[:5]] == [6, 6, 6, 6, 60]
    assert layout.tile_pages["q_proj"].length == 6 * 32 and layout.tile_rows["v_proj"].length == 6 * 16
    ordered = sorted(regions, key=lambda r: r.start)
    assert all(a.stop <= b.start for a, b in zip(ordered, ordered[1:]))
    assert all(r.start % ALIGN == 0 for r in regions) and ordered[-1].stop <= layout.size
    assert GraphLayout(6, 10, ("q_proj",), 16, None).tile_rows == {}  # base-only: no LoRA regions


@pytest.fixture
def graphs(tiny_model_dir, triton_device) -> DecodeGraphs:
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device=triton_device)
    pool = AdapterPool(args, 64, device=triton_device)
    for layer in model.attention_layers():
        layer.k_cache = torch.zeros(NUM_BLOCKS + 1, BLOCK, args.num_kv_heads, args.head_dim, device=triton_device)
        layer.v_cache = torch.zeros_like(layer.k_cache)
    return DecodeGraphs(model, pool, mode=STATIC, max_batch=8, max_rank=32, max_context=MAX_CONTEXT,
                        block_size=BLOCK, scratch_slot=SCRATCH, device=torch.device(triton_device))


def decode_step(num_seqs: int, groups: list[AdapterSegments] = ()) -> PackedStep:
    """num_seqs decodes: sequence i at context 5 + i % 3, in blocks [2i, 2i + 1]."""
    packed = PackedStep()
    for i in range(num_seqs):
        length = 5 + i % 3
        packed.tokens.append(10 + i)
        packed.positions.append(length - 1)
        packed.block_tables.append([2 * i, 2 * i + 1])
        packed.slots.append(packed.block_tables[-1][(length - 1) // BLOCK] * BLOCK + (length - 1) % BLOCK)
        packed.context_lens.append(length)
        packed.cu_seqlens.append(i + 1)
        packed.logits_rows.append(i)
        packed.sampled.append(None)
    packed.groups = list(groups)
    return packed


def adapter(start: int, end: int, pages: list[int], scale: float, modules: set[str]) -> AdapterSegments:
    segment = Segment(start, end, torch.tensor(pages), scale, tuple(pages))
    return AdapterSegments([segment], frozenset(modules))


def test_only_decode_steps_that_fit_take_a_graph(graphs):
    assert graphs.sizes == [1, 2, 4, 8] and graphs.paddings == [16, 32]
    assert graphs.choose(decode_step(3)).layout.batch == 4
    assert graphs.choose(decode_step(3)).layout.block_r is None  # no adapter: the base-only graph
    rank_32 = adapter(0, 1, list(range(20)), 1.0, {"q_proj"})
    assert graphs.choose(decode_step(3, [rank_32])).layout.block_r == 32
    assert graphs.choose(decode_step(9)) is None  # above the largest graph
    assert graphs.choose(decode_step(2, [adapter(0, 1, list(range(40)), 1.0, {"q_proj"})])) is None  # rank 40
    prefill = decode_step(2)
    prefill.tokens.append(7)  # a second token for the last sequence: not decode-only
    assert graphs.choose(prefill) is None


def test_static_buffers_hold_the_step_and_pad_the_rest(graphs):
    fin = adapter(0, 2, [3, 4], 0.5, {"q_proj", "v_proj"})
    legal = adapter(2, 3, [9, 10, 11, 12], 2.0, {"q_proj", "down_proj"})
    packed = decode_step(3, [fin, legal])
    step = graphs.choose(packed)
    logits = graphs.run(step, packed)
    assert logits.shape == (3, graphs.model.args.vocab_size) and torch.isfinite(logits).all()
    ctx = step.context
    assert step.token_ids.tolist() == [10, 11, 12, 0]
    assert ctx.positions.tolist() == [4, 5, 6, 0]
    assert ctx.slot_mapping.tolist() == [4, 13, 22, SCRATCH]  # padding writes K/V to the scratch block
    assert ctx.decode.context_lens.tolist() == [5, 6, 7, 0]  # padding attends over nothing
    assert ctx.decode.block_tables[:3, :2].tolist() == [[0, 1], [2, 3], [4, 5]]
    plans = ctx.lora.plans
    q = plans["q_proj"]
    assert q.tile_sizes.tolist() == [2, 1, 0, 0]
    assert q.tile_rows[0, :3].tolist() == [0, 1, -1] and q.tile_rows[1, :2].tolist() == [2, -1]
    assert q.tile_pages[1, :5].tolist() == [9, 10, 11, 12, -1]
    assert q.tile_scales.tolist() == [0.5, 2.0, 0.0, 0.0]
    assert plans["v_proj"].tile_sizes.tolist() == [2, 0, 0, 0]
    assert plans["down_proj"].tile_sizes.tolist() == [1, 0, 0, 0]
    assert plans["down_proj"].tile_rows[0, 0] == 2 and plans["down_proj"].tile_scales[0] == 2.0
    assert plans["k_proj"].tile_sizes.tolist() == [0, 0, 0, 0]  # no adapter targets it: empty tiles

    # A full step, then fewer sequences through the same graph: nothing of the earlier steps
    # survives in the row that is padding again, nor in tiles no adapter fills any more.
    graphs.run(step, decode_step(4, [adapter(0, 4, [7, 8], 3.0, {"q_proj"})]))
    assert ctx.slot_mapping.tolist()[3] != SCRATCH and plans["q_proj"].tile_sizes.tolist() == [4, 0, 0, 0]
    packed = decode_step(3, [adapter(0, 1, [5], 1.0, {"k_proj"})])
    assert graphs.choose(packed) is step
    graphs.run(step, packed)
    assert step.token_ids.tolist() == [10, 11, 12, 0] and ctx.positions.tolist() == [4, 5, 6, 0]
    assert ctx.slot_mapping.tolist()[3] == SCRATCH and ctx.decode.context_lens.tolist() == [5, 6, 7, 0]
    assert plans["q_proj"].tile_sizes.tolist() == [0] * 4 and plans["down_proj"].tile_sizes.tolist() == [0] * 4
    assert plans["k_proj"].tile_sizes.tolist() == [1, 0, 0, 0] and plans["k_proj"].tile_scales.tolist()[0] == 1.0
    assert graphs.replays == {(4, 16, 4): 3}


def test_steps_the_graphs_were_not_sized_for_run_eagerly(graphs):
    long_context = decode_step(2)
    long_context.block_tables[1] = list(range(MAX_CONTEXT // BLOCK + 1))  # one block past the graphs' tables
    assert graphs.choose(long_context) is None
    with pytest.raises(ValueError, match="5 sequences do not fit a graph of 4"):
        graphs.run(graphs.choose(decode_step(4)), decode_step(5))


def randomize(graphs: DecodeGraphs) -> None:
    """Random K/V caches and adapter pages, so a wrong row, tile or page shows in the logits."""
    torch.manual_seed(0)
    for layer in graphs.model.attention_layers():
        layer.k_cache.normal_()
        layer.v_cache.normal_()
    for pages in (graphs.pool.a, graphs.pool.b):
        for tensor in pages.values():
            tensor.normal_(std=0.1)


def eager_logits(graphs: DecodeGraphs, packed: PackedStep) -> torch.Tensor:
    """The eager path's logits for `packed`: its exact batch, the PyTorch LoRA reference."""
    from services.inference.adapters.batch import LoraBatch
    from services.inference.model.attention import build_decode_batch
    from services.inference.model.context import StepContext

    model, device, n = graphs.model, graphs.device, packed.num_seqs
    ctx = StepContext(positions=torch.tensor(packed.positions, device=device),
                      slot_mapping=torch.tensor(packed.slots, device=device), cu_seqlens=packed.cu_seqlens,
                      context_lens=packed.context_lens,
                      block_tables=[torch.tensor(t, device=device) for t in packed.block_tables],
                      logits_indices=torch.arange(n, device=device),
                      lora=LoraBatch(packed.groups, graphs.pool.a, graphs.pool.b, n, "torch"),
                      block_size=graphs.block_size)
    ctx.decode = build_decode_batch(ctx)
    return model.compute_logits(model(torch.tensor(packed.tokens, device=device), ctx))


def test_a_padded_graph_step_gives_the_logits_of_the_eager_forward(graphs):
    """The same three decodes through the static step (padded to 4 rows) and through the eager
    path's batch of exactly three: equal logits (padding changes nothing in the real rows)."""
    randomize(graphs)
    fin = adapter(0, 2, [3, 4], 0.5, {"q_proj", "v_proj", "down_proj"})
    packed = decode_step(3, [fin])
    graphed = graphs.run(graphs.choose(packed), packed).clone()
    torch.testing.assert_close(graphed, eager_logits(graphs, packed), rtol=1e-4, atol=1e-4)


def random_cuda_model_and_pool(tiny_model_dir, num_blocks: int = NUM_BLOCKS):
    """bf16 random weights, KV cache (num_blocks + the scratch block) and adapter pages on the
    GPU: what a captured graph replays."""
    model, args = random_model(tiny_model_dir, dtype=torch.bfloat16, device="cuda")
    pool = AdapterPool(args, 64, dtype=torch.bfloat16, device="cuda")
    for layer in model.attention_layers():
        layer.k_cache = torch.randn(num_blocks + 1, BLOCK, args.num_kv_heads, args.head_dim, device="cuda",
                                    dtype=torch.bfloat16)
        layer.v_cache = torch.randn_like(layer.k_cache)
    for pages in (pool.a, pool.b):
        for tensor in pages.values():
            tensor.normal_(std=0.1)
    return model, pool


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a GPU")
def test_captured_graphs_replay_what_the_static_body_computes(tiny_model_dir):
    model, pool = random_cuda_model_and_pool(tiny_model_dir)
    kwargs = dict(max_batch=8, max_rank=32, max_context=MAX_CONTEXT, block_size=BLOCK, scratch_slot=SCRATCH,
                  device=torch.device("cuda"))
    captured = DecodeGraphs(model, pool, mode=CAPTURE, **kwargs)
    captured.capture()
    static = DecodeGraphs(model, pool, mode=STATIC, **kwargs)
    for packed in (decode_step(3, [adapter(0, 2, [3, 4], 0.5, {"q_proj", "down_proj"})]), decode_step(5),
                   decode_step(8, [adapter(1, 8, list(range(20, 40)), 1.5, {"v_proj"})])):
        replayed = captured.run(captured.choose(packed), packed).clone()
        assert captured.choose(packed).graph is not None
        torch.testing.assert_close(replayed, static.run(static.choose(packed), packed), rtol=2e-2, atol=2e-2)
