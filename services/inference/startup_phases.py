"""How long each phase of a node's start took: what an operator waits for, NOT_SERVING.

On a GPU a node's start is more than loading weights: it compiles and times the prefill LoRA
kernels per projection shape, times the decode graphs' LoRA launches per shape (out-block
width, split-K, beside the GEMM or not), then captures a CUDA graph per (batch, rank padding,
tile capacity), 74 of them at max batch 64 and max rank 64. Each phase is timed here so the
log line and the benchmarks say which one a slow start spent its time in (--tuning-cache-dir
skips the decode tuning on a restart; fewer graphs come from --max-graph-batch).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class StartupPhases:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}  # phase -> seconds, in the order they ran

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block, the device's queued work included (a GPU phase is not over when its
        last launch returns)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def summary(self) -> str:
        phases = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seconds.items())
        return f"{self.total:.1f} s ({phases})"
