"""A projection's LoRA beside its base GEMM, on a second CUDA stream.

Why: at decode both read only the layer's input, and neither fills the GPU alone. The shrink is
a few µs of dependent loads per launch (on the H200, v3: 1.29 ms of a 9.63 ms batch-64 step
over 128 launches), and a decode-shaped GEMM runs fewer programs than the GPU has SMs for
much of its time. On two streams, the shrink's programs take the SMs the GEMM leaves idle
and its latency hides behind the GEMM's, instead of adding to it. Captured in a CUDA graph,
the fork and join become two branches of the graph, so a replay pays no host work for them.

Modes (BESIDE_MODES), per launch shape, measured at start-up (kernels/decode_lora_tuning.py):
- "off": the GEMM, then the shrink and the expand (which adds into the GEMM's output);
- "shrink": the shrink beside the GEMM; the expand after both;
- "lora": the shrink and the expand beside the GEMM, the expand adding into a zeroed delta
  that is added to the GEMM's output after both. The delta costs a memset (hidden) and an add
  (not hidden), and rounds the LoRA term to the output's dtype before the sum, as HF peft does
  (result + lora_B(lora_A(x)) * scaling); "off" and "shrink" round once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F

from services.inference.kernels.triton_lora import SlicedLora

T = TypeVar("T")
BESIDE_MODES = ("off", "shrink", "lora")
CHOICES = ("auto", *BESIDE_MODES)  # --decode-lora-beside-gemm: auto is measured per shape


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


def linear_with_lora(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch: SlicedLora,
                     mode: str, side_stream: torch.cuda.Stream | None) -> torch.Tensor:
    """Semantics: F.linear(x, weight, bias) with launch's LoRA added to its columns, the LoRA
    placed beside the GEMM as `mode` says (BESIDE_MODES; without a side stream, in order)."""
    if mode == "lora" and not launch.empty:
        # Allocated here, on the current stream, before the fork (see beside).
        delta = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)

        def lora() -> None:
            delta.zero_()  # rows of no tile get nothing
            launch.shrink()
            launch.expand(delta)
        return beside(side_stream, lora, lambda: F.linear(x, weight, bias)).add_(delta)
    if mode == "shrink":
        return launch.expand(beside(side_stream, launch.shrink, lambda: F.linear(x, weight, bias)))
    if mode not in BESIDE_MODES:
        raise ValueError(f"mode must be one of {', '.join(BESIDE_MODES)}, got {mode!r}")
    y = F.linear(x, weight, bias)
    launch.shrink()
    return launch.expand(y)
