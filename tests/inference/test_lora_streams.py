"""A projection's LoRA, or its shrink, beside its base GEMM (kernels/streams.py,
--decode-lora-beside-gemm).

On CPU there is no second stream: `beside` runs the two in order, and every mode must still
give the GEMM plus the reference LoRA, alone and in a whole decode step. On a GPU (the device
script runs these), the join must hold: work enqueued after `beside` sees both results, eagerly
and replayed from a graph, and captured decode graphs give the logits of the LoRA after the GEMM.
"""

from __future__ import annotations

import pytest
import torch

from services.inference.adapters.pool import AdapterPool
from services.inference.engine.decode_graphs import CAPTURE, STATIC, DecodeGraphs
from services.inference.kernels.reference import Segment, lora_segments
from services.inference.kernels.streams import BESIDE_MODES, beside, linear_with_lora, side_stream_for
from services.inference.kernels.triton_lora import LoraSlice, SlicedLora, build_lora_plan
from services.inference.model.loader import random_model
from tests.inference.test_decode_graphs import (BLOCK, MAX_CONTEXT, NUM_BLOCKS, SCRATCH, adapter, decode_step,
                                                eager_logits, random_cuda_model_and_pool, randomize)

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="a second CUDA stream needs a GPU")


def test_without_a_side_stream_the_side_work_runs_first():
    order: list[str] = []
    result = beside(None, lambda: order.append("side"), lambda: order.append("main") or "main's result")
    assert order == ["side", "main"] and result == "main's result"
    assert side_stream_for("cpu", True) is None


@pytest.mark.parametrize("mode", BESIDE_MODES)
def test_every_mode_gives_the_gemm_plus_the_lora(triton_device, mode):
    torch.manual_seed(0)
    x, weight, bias = torch.randn(6, 64), torch.randn(96, 64) / 8, torch.randn(96)
    a_pages, b_pages = torch.randn(40, 64) / 8, torch.randn(40, 96) / 4
    segments = [Segment(0, 2, torch.arange(0, 8), 0.5), Segment(3, 6, torch.arange(20, 24), 2.0)]  # row 2: none
    want = lora_segments(torch.nn.functional.linear(x, weight, bias), x, a_pages, b_pages, segments)
    on = lambda t: t.to(triton_device)  # noqa: E731
    segments = [Segment(s.start, s.end, on(s.pages), s.scale) for s in segments]
    plan = build_lora_plan(segments, 6, triton_device)
    launch = SlicedLora(on(x), [LoraSlice(on(a_pages), on(b_pages), plan, 0)])
    got = linear_with_lora(on(x), on(weight), on(bias), launch, mode, None)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


def test_an_unknown_mode_is_refused(triton_device, tiny_model_dir):
    x = torch.zeros(2, 64, device=triton_device)
    plan = build_lora_plan([Segment(0, 2, torch.arange(4, device=triton_device), 1.0)], 2, triton_device)
    launch = SlicedLora(x, [LoraSlice(torch.zeros(8, 64, device=triton_device),
                                      torch.zeros(8, 32, device=triton_device), plan, 0)])
    with pytest.raises(ValueError, match="mode must be one of off, shrink, lora"):
        linear_with_lora(x, torch.zeros(32, 64, device=triton_device), None, launch, "always", None)
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="lora_beside_gemm must be one of auto, off, shrink, lora"):
        DecodeGraphs(model, AdapterPool(args, 8), mode=STATIC, max_batch=2, max_rank=16, max_context=MAX_CONTEXT,
                     block_size=BLOCK, scratch_slot=SCRATCH, device=torch.device("cpu"), lora_beside_gemm="on")


@pytest.mark.parametrize("mode", BESIDE_MODES)
def test_a_graph_step_in_every_mode_gives_the_eager_logits(tiny_model_dir, triton_device, mode):
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device=triton_device)
    model.use_fused_ops(True)  # q|k|v and gate|up as slices of one launch
    pool = AdapterPool(args, 64, device=triton_device)
    for layer in model.attention_layers():
        layer.k_cache = torch.zeros(NUM_BLOCKS + 1, BLOCK, args.num_kv_heads, args.head_dim, device=triton_device)
        layer.v_cache = torch.zeros_like(layer.k_cache)
    graphs = DecodeGraphs(model, pool, mode=STATIC, max_batch=4, max_rank=16, max_context=MAX_CONTEXT,
                          block_size=BLOCK, scratch_slot=SCRATCH, device=torch.device(triton_device),
                          lora_beside_gemm=mode)
    randomize(graphs)
    packed = decode_step(4, [adapter(0, 2, [3, 4], 0.5, set(pool.a)), adapter(3, 4, [9, 10, 11], 2.0, {"v_proj"})])
    logits = graphs.run(graphs.choose(packed), packed).clone()
    torch.testing.assert_close(logits, eager_logits(graphs, packed), rtol=1e-4, atol=1e-4)


@needs_gpu
def test_side_stream_only_where_asked():
    assert side_stream_for("cuda", False) is None
    assert isinstance(side_stream_for("cuda", True), torch.cuda.Stream)


def _slow_side_and_quick_main(side: torch.cuda.Stream):
    """A side result that takes long (a chain of matmuls) and a quick main one; their sum after
    `beside` is right only if the current stream waited for the side stream."""
    # Near the identity: its powers stay near it, so a side result read too early (still zero)
    # is far from the right one.
    x = torch.eye(2048, device="cuda") + torch.randn(2048, 2048, device="cuda") * 0.01 / 2048 ** 0.5
    side_out, main_out = torch.empty_like(x), torch.empty(2048, device="cuda")

    def side_work() -> None:
        y = x
        for _ in range(20):
            y = y @ x
        side_out.copy_(y)

    def step() -> torch.Tensor:
        beside(side, side_work, lambda: main_out.fill_(1.0))
        return side_out.sum(dim=1) + main_out

    want = x
    for _ in range(20):
        want = want @ x
    return step, want.sum(dim=1) + 1.0, (side_out, main_out)


@needs_gpu
def test_work_after_beside_sees_both_results_eagerly_and_from_a_graph():
    side = side_stream_for("cuda", True)
    step, want, buffers = _slow_side_and_quick_main(side)
    torch.testing.assert_close(step(), want, rtol=1e-3, atol=1e-3)
    for buffer in buffers:
        buffer.zero_()
    warm = torch.cuda.Stream()  # warm up off the capture stream, as PyTorch's graph docs ask
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        step()
    torch.cuda.current_stream().wait_stream(warm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for buffer in buffers:
        buffer.zero_()
    graph.replay()
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-3)


@needs_gpu
@pytest.mark.parametrize("mode", [CAPTURE, STATIC])
def test_captured_graphs_give_the_logits_of_the_lora_after_the_gemm(tiny_model_dir, mode):
    model, pool = random_cuda_model_and_pool(tiny_model_dir)
    model.use_fused_ops(True)
    kwargs = dict(mode=mode, max_batch=8, max_rank=32, max_context=MAX_CONTEXT, block_size=BLOCK,
                  scratch_slot=SCRATCH, device=torch.device("cuda"))
    graphs = {beside_mode: DecodeGraphs(model, pool, lora_beside_gemm=beside_mode, **kwargs)
              for beside_mode in BESIDE_MODES}
    assert graphs["shrink"].side_stream is not None and graphs["off"].side_stream is None
    for each in graphs.values():
        each.capture()
    for packed in (decode_step(3, [adapter(0, 2, [3, 4], 0.5, {"q_proj", "down_proj"})]),
                   decode_step(8, [adapter(0, 5, list(range(20, 40)), 1.5, set(pool.a)),
                                   adapter(5, 8, [1, 2, 7], 2.0, {"v_proj", "gate_proj", "o_proj"})])):
        after = graphs["off"].run(graphs["off"].choose(packed), packed).clone()
        # The shrink beside the GEMM: the same kernels on the same data, bit for bit.
        assert torch.equal(graphs["shrink"].run(graphs["shrink"].choose(packed), packed), after)
        # All of the LoRA beside it: its term rounded to bf16 before the sum, as HF peft does.
        torch.testing.assert_close(graphs["lora"].run(graphs["lora"].choose(packed), packed), after,
                                   rtol=2e-2, atol=2e-2)
