"""Per-layer LoRA, paged decode attention and paged prefill attention after cached context:
each path's time against its byte floor (and, for prefill, its FLOP rate).

  python -m bench.kernels --device cuda --json out.json     # the H200 figures of issue #8
  python -m bench.kernels --device cpu --smoke              # seconds: checks the script itself

Every variant is first checked against the float32 reference (kernels/reference.py, or the
model's plain attention), then timed. On CUDA each call is captured in a CUDA graph and
replayed (what the decode step will do), timed with CUDA events; a variant that cannot be
captured (host work per call) is timed eagerly and marked so. The byte floor of a call is
the bytes it must move (activations in and out, the distinct adapters' pages, the KV it
reads) over the copy bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.machine import describe, report


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (read + write counted)."""
    source = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = time_call(lambda: target.copy_(source), device, iterations=20)["seconds"]
    return 2 * source.numel() / seconds


def time_call(fn: Callable[[], object], device: torch.device, iterations: int) -> dict:
    """Seconds per call: CUDA graph replay when capturable, else eager; wall clock on CPU."""
    fn()  # warm-up: compiles Triton kernels, allocates workspaces
    if device.type != "cuda":
        started = time.perf_counter()
        for _ in range(iterations):
            fn()
        return {"seconds": (time.perf_counter() - started) / iterations, "graph": False}
    torch.cuda.synchronize()
    graph, replay = None, fn
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # a second warm-up on the capture stream, as PyTorch's graph docs ask
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        replay = graph.replay
    except RuntimeError:  # host work inside the call (e.g. a tensor built from a list)
        graph = None
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    replay()
    start.record()
    for _ in range(iterations):
        replay()
    end.record()
    torch.cuda.synchronize()
    return {"seconds": start.elapsed_time(end) / 1000 / iterations, "graph": graph is not None}


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-12)).item()


def run_case(case, device: torch.device, bandwidth: float, iterations: int, tolerance: float) -> dict:
    """One shape: correctness of every variant first, then its time and fraction of the floor."""
    floor_seconds = case.bytes_moved / bandwidth
    result = {"case": case.name, **case.describe(), "bytes": case.bytes_moved, "floor_us": floor_seconds * 1e6,
              "variants": {}}
    want = case.expected()
    if hasattr(case, "base_gemm"):  # the layer's own matmul, for scale: what LoRA adds to it
        result["base_gemm_us"] = time_call(case.base_gemm(), device, iterations)["seconds"] * 1e6
    for name, build in case.variants().items():
        entry: dict = {}
        try:
            variant = build()
            got = variant.check()
            entry["relative_error"] = relative_error(got, want)
            entry["correct"] = entry["relative_error"] <= tolerance
            timing = time_call(variant.run, device, iterations)
            entry |= {"us": timing["seconds"] * 1e6, "cuda_graph": timing["graph"],
                      "x_floor": timing["seconds"] / floor_seconds}
            if hasattr(case, "flops"):  # compute-bound shapes: the rate says more than the byte floor
                entry["tflops"] = case.flops / timing["seconds"] / 1e12
        except Exception as exc:  # one broken variant must not cost the rest of a device run
            entry["error"] = f"{type(exc).__name__}: {exc}"
        result["variants"][name] = entry
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few iterations (checks the script)")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":  # Triton kernels run on the CPU only in its interpreter (slow: use --smoke)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    # Imported only now: `import triton` (pulled in by the model code) fixes interpreted vs
    # compiled for triton's own helpers, so the variable must be set first.
    from bench.kernel_cases import attention_cases, continued_prefill_cases, lora_cases

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tolerance = 3e-2 if dtype == torch.bfloat16 else 1e-4
    iterations = 2 if args.smoke else args.iterations
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(device)
    result = {"machine": describe(), "device": str(device), "dtype": str(dtype), "copy_bandwidth_gbs": bandwidth / 1e9,
              "tolerance": tolerance, "lora": [], "attention": [], "prefill_attention": []}
    for case in lora_cases(device, dtype, smoke=args.smoke):
        result["lora"].append(run_case(case, device, bandwidth, iterations, tolerance))
        print(json.dumps(result["lora"][-1]), file=sys.stderr, flush=True)  # progress for long device runs
    for case in attention_cases(device, dtype, smoke=args.smoke):
        result["attention"].append(run_case(case, device, bandwidth, iterations, tolerance))
        print(json.dumps(result["attention"][-1]), file=sys.stderr, flush=True)
    for case in continued_prefill_cases(device, dtype, smoke=args.smoke):
        result["prefill_attention"].append(run_case(case, device, bandwidth, iterations, tolerance))
        print(json.dumps(result["prefill_attention"][-1]), file=sys.stderr, flush=True)
    result["all_correct"] = all(v.get("correct", False) for group in ("lora", "attention", "prefill_attention")
                                for case in result[group] for v in case["variants"].values())
    report(result, args.json)
    return 0 if result["all_correct"] else 1


if __name__ == "__main__":
    sys.exit(main())
