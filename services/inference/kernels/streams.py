"""A LoRA shrink beside its base GEMM, on a second CUDA stream.

Why: at decode both read only the layer's input, and neither fills the GPU alone. The shrink is
a few µs of dependent loads per launch (on the H200, v3: 1.29 ms of a 9.63 ms batch-64 step
over 128 launches), and a decode-shaped GEMM runs fewer programs than the GPU has SMs for
much of its time. On two streams, the shrink's programs take the SMs the GEMM leaves idle
and its latency hides behind the GEMM's, instead of adding to it. Captured in a CUDA graph,
the fork and join become two branches of the graph, so a replay pays no host work for them.

The expand must wait for both (it adds into the GEMM's output and reads the shrink's), so the
current stream waits for the side stream before anything enqueued after `beside` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def side_stream_for(device: torch.device | str, enabled: bool) -> torch.cuda.Stream | None:
    """A stream for `beside`, or None where there is none to use (CPU, or disabled)."""
    device = torch.device(device)
    return torch.cuda.Stream(device) if enabled and device.type == "cuda" else None


def beside(side_stream: torch.cuda.Stream | None, side_work: Callable[[], object], main_work: Callable[[], T]) -> T:
    """Semantics: side_work(); return main_work() — with side_work on side_stream when one is
    given, both after everything already enqueued on the current stream, and everything
    enqueued on the current stream afterwards after both.

    Memory side_work writes must be allocated before the call, on the current stream (e.g.
    SlicedLora's partials): the caching allocator then keeps it until the current stream,
    which has joined the side stream, frees it.
    """
    if side_stream is None:
        side_work()
        return main_work()
    main = torch.cuda.current_stream(side_stream.device)
    side_stream.wait_stream(main)
    with torch.cuda.stream(side_stream):
        side_work()
    result = main_work()
    main.wait_stream(side_stream)
    return result
