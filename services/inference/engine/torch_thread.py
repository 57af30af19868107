"""One long-lived thread for all of a node's torch work (model load, steps, adapter parsing).

Measured on this 2-core CPU box: once a thread has run an OpenMP-parallel torch op, its
OpenMP team lives on, and small GEMMs issued from any other thread then run ~1.6x slower
(16x512 @ 512x1408: 258 µs vs 425 µs; a whole decode step 62 ms vs 131 ms). Keeping every
heavy op on one thread avoids the second team entirely.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class TorchThread:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loraplex-torch")

    def run(self, fn: Callable[[], T]) -> T:
        """Runs fn on the torch thread and waits for it (before the engine loop starts)."""
        return self._executor.submit(fn).result()

    def start(self, loop_fn: Callable[[], None]) -> Future:
        """Hands the thread to a long-running loop (the engine); returns its future."""
        return self._executor.submit(loop_fn)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)
