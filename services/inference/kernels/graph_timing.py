"""Timing a launch as a captured decode step runs it: replayed from a CUDA graph, its pages cold.

Why not triton.testing.do_bench: it launches the call from Python each time, and a decode LoRA
launch pair (~40 arguments through Triton's launcher, plus our checks) can take longer on the
host than on the GPU, so the host's pace leaks into the figure and hides the differences
start-up tuning looks for. A graph replays the launches back to back, as a step does. And why
the flush: in a step the layers between two uses of a projection's pages stream ~0.4 GB of
weights through L2, so the pages are read from HBM; repeating one call alone would serve them
from L2 (64 rank-16 adapters of q|k|v are ~21 MB, less than an H200's L2).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

FLUSH_BYTES = 128 * 2**20  # over twice the L2 of the GPUs we run on (H100, H200: 50-60 MB)


class GraphTimer:
    """Median µs per call of `call` replayed from a CUDA graph, L2 flushed before each call.

    Each measurement captures `calls` x (flush, call) in one graph and the `calls` flushes alone
    in another, replays both `replays` times, interleaved so that drifting clocks touch both,
    and takes the difference of their medians over `calls`. Not capturable (host work in the
    call) raises, as such a call could not run in a decode graph either.
    """

    def __init__(self, device: torch.device | str = "cuda", *, calls: int = 8, replays: int = 5,
                 flush_bytes: int = FLUSH_BYTES) -> None:
        self.device, self.calls, self.replays = torch.device(device), calls, replays
        self.flush = torch.empty(flush_bytes, dtype=torch.uint8, device=self.device)

    def _capture(self, call: Callable[[], object] | None) -> torch.cuda.CUDAGraph:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(self.calls):
                self.flush.zero_()
                if call is not None:
                    call()
        return graph

    def _medians_us(self, graphs: list[torch.cuda.CUDAGraph]) -> list[float]:
        samples: list[list[float]] = [[] for _ in graphs]
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in graphs]
        for graph in graphs:
            graph.replay()  # first replay: uploads the graph
        for _ in range(self.replays):
            for graph, (start, end) in zip(graphs, events):
                start.record()
                graph.replay()
                end.record()
            torch.cuda.synchronize(self.device)
            for times, (start, end) in zip(samples, events):
                times.append(start.elapsed_time(end) * 1000)
        return [statistics.median(times) for times in samples]

    def __call__(self, call: Callable[[], object]) -> float:
        with torch.cuda.device(self.device):
            # Warm up off the capture stream, as PyTorch's graph docs ask: compiles, allocates.
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                call()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize(self.device)
            with_call, flushes = self._capture(call), self._capture(None)
            both, alone = self._medians_us([with_call, flushes])
            del with_call, flushes  # their memory pools go back before the next candidate
        return max(0.0, (both - alone) / self.calls)
