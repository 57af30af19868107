"""The LoRA shrink beside its base GEMM (kernels/streams.py, --decode-lora-beside-gemm).

On CPU there is no second stream: `beside` runs the two in order. On a GPU (the device script
runs these), the join must hold: work enqueued after `beside` sees both results, eagerly and
replayed from a graph, and decode graphs give the same logits with the shrink beside the GEMM
as with it after.
"""

from __future__ import annotations

import pytest
import torch

from services.inference.engine.decode_graphs import CAPTURE, STATIC, DecodeGraphs
from services.inference.kernels.streams import beside, side_stream_for
from tests.inference.test_decode_graphs import BLOCK, MAX_CONTEXT, SCRATCH, adapter, decode_step, \
    random_cuda_model_and_pool

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="a second CUDA stream needs a GPU")


def test_without_a_side_stream_the_side_work_runs_first():
    order: list[str] = []
    result = beside(None, lambda: order.append("side"), lambda: order.append("main") or "main's result")
    assert order == ["side", "main"] and result == "main's result"
    assert side_stream_for("cpu", True) is None


@needs_gpu
def test_side_stream_only_where_asked():
    assert side_stream_for("cuda", False) is None
    assert isinstance(side_stream_for("cuda", True), torch.cuda.Stream)


def _slow_side_and_quick_main(side: torch.cuda.Stream):
    """A side result that takes long (a chain of matmuls) and a quick main one; their sum after
    `beside` is right only if the current stream waited for the side stream."""
    x = torch.randn(2048, 2048, device="cuda") / 2048 ** 0.5
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
def test_decode_graphs_give_the_same_logits_with_the_shrink_beside_the_gemm(tiny_model_dir, mode):
    model, pool = random_cuda_model_and_pool(tiny_model_dir)
    kwargs = dict(mode=mode, max_batch=8, max_rank=32, max_context=MAX_CONTEXT, block_size=BLOCK,
                  scratch_slot=SCRATCH, device=torch.device("cuda"))
    apart, after = DecodeGraphs(model, pool, lora_beside_gemm=True, **kwargs), \
        DecodeGraphs(model, pool, lora_beside_gemm=False, **kwargs)
    assert apart.side_stream is not None and after.side_stream is None
    apart.capture()
    after.capture()
    for packed in (decode_step(3, [adapter(0, 2, [3, 4], 0.5, {"q_proj", "down_proj"})]),
                   decode_step(8, [adapter(0, 5, list(range(20, 40)), 1.5, set(pool.a)),
                                   adapter(5, 8, [1, 2, 7], 2.0, {"v_proj", "gate_proj", "o_proj"})])):
        got = apart.run(apart.choose(packed), packed).clone()
        # Same kernels in the same order on each output: bit for bit.
        assert torch.equal(got, after.run(after.choose(packed), packed))
