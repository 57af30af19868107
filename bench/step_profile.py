"""Where a graphed decode step's time goes, for the engine matrix (--profile-steps).

The matrix reports decode tokens/s, i.e. wall time per step: GPU work plus whatever the host
adds between replays (schedule, pack, fill the graph's buffers, sample, detokenize). While a
configuration runs, the last graphed step of its largest batch is kept (the graph variant and
the packed step: the last steps of a run hold fewer sequences, since prompts are admitted in
chunks and finish in turn). Afterwards that step is prepared again (the variants share one
input buffer) and its graph replayed: the same batch, adapters and context, its K/V written
again to the same slots, which no running sequence owns any more. Timed with CUDA events that
is the step's pure GPU time, and under torch.profiler its kernels, grouped by name, per step.
"""

from __future__ import annotations

import statistics

import torch

REPLAYS = 20
TOP_KERNELS = 25


class LastGraphedStep:
    """Wraps DecodeGraphs.run to remember the last step of the largest graphed batch: (variant, packed step)."""

    def __init__(self, graphs) -> None:
        self.graphs, self.kept = graphs, None
        run = graphs.run

        def remembering(step, packed):
            if self.kept is None or step.layout.batch >= self.kept[0].layout.batch:
                self.kept = (step, packed)
            return run(step, packed)

        graphs.run = remembering

    def take(self):
        """The kept step, its inputs back in the graphs' buffer (ready to replay); None if none."""
        kept, self.kept = self.kept, None
        if kept is None:
            return None
        self.graphs.prepare(*kept)
        return kept[0]


def replay_ms(step, replays: int = REPLAYS) -> dict:
    """GPU milliseconds per replay of `step`'s graph (median and spread of `replays`)."""
    step.graph.replay()  # warm: the first replay after host work may wait on clocks
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step.graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return {"gpu_ms_p50": statistics.median(times), "gpu_ms_min": min(times), "gpu_ms_max": max(times),
            "batch": step.layout.batch, "block_r": step.layout.block_r, "tile_capacity": step.layout.tile_capacity}


def kernel_table(step, replays: int = 5, top: int = TOP_KERNELS) -> dict:
    """The kernels of `replays` replays, by name: calls and GPU µs per step, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            step.graph.replay()
        torch.cuda.synchronize()
    rows = []
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            rows.append({"name": event.key[:120], "calls_per_step": event.count / replays,
                         "us_per_step": device_us / replays})
    rows.sort(key=lambda row: row["us_per_step"], reverse=True)
    return {"kernels": rows[:top], "kernel_us_per_step": sum(row["us_per_step"] for row in rows),
            "launches_per_step": sum(row["calls_per_step"] for row in rows), "distinct_kernels": len(rows)}


def profile_last_step(tracker: LastGraphedStep, run: dict, with_kernels: bool) -> None:
    """Adds the last graphed step's GPU time (and kernels) to a configuration's `run` entry."""
    step = tracker.take()
    if step is None or step.graph is None:
        return
    profile = replay_ms(step)
    steps = run["decode_tokens"] / run["batch"]
    if steps and run["decode_seconds"]:
        profile["wall_ms_per_decode_step"] = 1000 * run["decode_seconds"] / steps
        profile["gpu_share_of_wall"] = profile["gpu_ms_p50"] / profile["wall_ms_per_decode_step"]
    if with_kernels:
        try:
            profile |= kernel_table(step)
        except Exception as error:  # noqa: BLE001 - a profiler without CUPTI must not lose the timings
            profile["kernel_table_error"] = repr(error)
    run["step_profile"] = profile
