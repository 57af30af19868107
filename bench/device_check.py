"""The one script a GPU session runs (issue #8): correctness first, then timings, into OUT_DIR.

  python -m bench.device_check OUT_DIR [--budget-seconds 500]

Installs nothing. Steps, each a subprocess with its own deadline inside the budget, each
leaving its JSON and log in OUT_DIR even when a later step fails or times out:
  1. gpu.json      what the machine is (torch, CUDA, device, free memory);
  2. triton_tests  the Triton kernel tests compiled on the GPU (bf16 included, the fused
                   element-wise kernels' bf16 rounding against PyTorch's, and no
                   recompiles across steps; the paged prefill kernel for chunks after cached
                   context too), the CUTLASS grouped GEMM in bf16, the prefill LoRA choice,
                   and the CUDA-graph decode step: captured graphs replay what the static
                   body computes; overlapped graphed decode steps sync the stream nowhere
                   but at their event waits, nor does an adapter's load into the pool
                   (CUDA's sync debug mode);
                   (none of the steps imports our gRPC stack: no wheels need carrying)
  3. oracle        the oracle tests (HF + peft tokens) on CUDA: PyTorch kernels, Triton kernels,
                   and Triton kernels with captured decode graphs, in float32 token for token;
                   then serving in bf16 (Triton, graphs) against HF + peft's own bf16 error;
  4. engine.json   bench/engine.py --matrix on CUDA, Llama-3-8B shape (random bf16 weights),
                   Triton kernels and CUDA graphs: decode tokens/s at batch 1/16/64 with
                   1/16/64 adapters vs base-only and HF peft, TTFT, adapter load latency;
                   each configuration's GPU time per step (its last graphed step replayed)
                   next to its wall time, and the kernels of three steps (--profile-steps);
                   overlapped decode steps on, and each batch >= 16 once more with them off.
     engine_fallback.json  only when the engine step lost a batch-64 target configuration
                   to a failure: batch 64 again with the paths no GPU has run yet turned off;
  5. kernels.json  bench/kernels.py on CUDA: every LoRA and attention path checked against
                   the float32 reference at bf16 tolerance, then timed under CUDA graphs
                   against the byte floor; "prefill_attention": 16 chunks of 256 tokens
                   after 512 cached, the Triton paged prefill kernel vs the per-sequence
                   loop (with TFLOP/s);
  6. host.json     bench/host_overhead.py on this machine's CPU: host work per decode step;
summary.json lists each step's status and wall time; targets.json (bench/targets.py) says which
of issue #8's targets the figures meet, also printed as a table. Exit status 0 when every step
passed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import targets

# Correctness first, then the figures issue #8's open targets are set on (the engine matrix,
# told its share through {budget}), then the kernel sweeps and the host's share, which the
# engine's start-up tuning and step profiles partly cover: a budget that runs short costs those.
# Limits add up to more than the budget on purpose: early steps rarely use theirs.
STEPS = [
    ("gpu", ["-c", "import json, torch; free, total = torch.cuda.mem_get_info(); print(json.dumps({"
                   "'torch': torch.__version__, 'cuda': torch.version.cuda, 'device': torch.cuda.get_device_name(0), "
                   "'capability': torch.cuda.get_device_capability(0), 'free_gib': free / 2**30, "
                   "'total_gib': total / 2**30}))"], 60),
    # The sm_90 compile-only and cache-key tests are left out: the GPU compiles and counts for real here.
    ("triton_tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/inference/test_triton_lora.py",
                      "tests/inference/test_triton_attention.py", "tests/inference/test_triton_prefill_attention.py",
                      "tests/inference/test_decode_graphs.py", "tests/inference/test_triton_fused.py",
                      "tests/inference/test_triton_lora_slices.py", "tests/inference/test_graph_tile_buckets.py",
                      "tests/inference/test_overlapped_steps.py",
                      "tests/inference/test_kernels_reference.py", "tests/inference/test_prefill_lora.py",
                      "tests/inference/test_decode_lora_tuning.py", "tests/inference/test_graph_timing.py",
                      "tests/inference/test_lora_streams.py", "tests/inference/test_adapter_host_form.py",
                      "-k", "not compile_for_hopper and not share_the_compiled"], 170),
    ("oracle", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/inference/test_oracle.py",
                "-k", "mixed_batch or triton or graphed or bfloat16"], 90),
    # --json keeps what finished when the step is cut off (stdout is printed only at the end).
    ("engine", ["-m", "bench.engine", "--device", "cuda", "--preset", "llama8b", "--matrix", "--kernels", "triton",
                "--prompt-len", "512", "--gen-len", "128", "--budget-seconds", "{budget}",
                "--profile-steps", "--compare-overlap", "--repeat", "2", "--json", "{out}/engine_partial.json"], 270),
    # Only when the engine step lost a target configuration to a failure (bench/targets.py's
    # lost_configurations): the matrix again without the paths built since the last GPU run
    # (v4-v8: overlapped steps, start-up LoRA tuning, LoRA beside its GEMM), so one broken new
    # path costs its own figures, not the run's. Batch 64 only, once each, no HF.
    ("engine_fallback", ["-m", "bench.engine", "--device", "cuda", "--preset", "llama8b", "--matrix", "--kernels",
                         "triton", "--prompt-len", "512", "--gen-len", "128", "--budget-seconds", "{budget}",
                         "--matrix-batches", "64", "--matrix-adapters", "16,64", "--skip-hf", "--repeat", "1",
                         "--overlap-steps", "off", "--decode-lora-tuning", "off", "--lora-beside-gemm", "off",
                         "--json", "{out}/engine_fallback_partial.json"], 180),
    ("kernels", ["-m", "bench.kernels", "--device", "cuda"], 110),
    # The GPU machine's own CPU: host work per decode step, next to the engine's step times.
    ("host", ["-m", "bench.host_overhead", "--batch", "64", "--steps", "64"], 45),
]


STEP_MARGIN_SECONDS = 45


def run_step(name: str, args: list[str], deadline: float, out: Path) -> dict:
    started = time.monotonic()
    try:
        # {budget}: the step's own deadline less a margin for what its budget cannot cut short
        # (an HF peft run already started, writing the JSON).
        budget = str(max(10, int(deadline - STEP_MARGIN_SECONDS)))
        command = [sys.executable, *(arg.replace("{out}", str(out)).replace("{budget}", budget) for arg in args)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=deadline)
        status = "passed" if result.returncode == 0 else f"exit {result.returncode}"
        stdout, stderr = result.stdout, result.stderr
    except subprocess.TimeoutExpired as exc:
        status = f"timed out after {deadline:.0f}s"
        stdout, stderr = (exc.stdout or b"").decode(errors="replace"), (exc.stderr or b"").decode(errors="replace")
    (out / f"{name}.json").write_text(stdout)
    (out / f"{name}.log").write_text(stderr)
    return {"step": name, "status": status, "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the JSON files (created)")
    parser.add_argument("--budget-seconds", type=float, default=500.0, help="all steps together")
    parser.add_argument("--steps", default=",".join(name for name, _, _ in STEPS),
                        help="comma-separated subset of the steps, in their order")
    args = parser.parse_args(argv)
    chosen = set(args.steps.split(","))
    if unknown := chosen - {name for name, _, _ in STEPS}:
        parser.error(f"unknown steps: {', '.join(sorted(unknown))}")
    args.out.mkdir(parents=True, exist_ok=True)
    ends = time.monotonic() + args.budget_seconds
    summary = []
    for name, step_args, limit in (step for step in STEPS if step[0] in chosen):
        left = ends - time.monotonic()
        if name == "engine_fallback" and not (lost := targets.lost_configurations(args.out)):
            continue  # the engine step measured (or ran out of budget for) every target configuration
        if name == "engine_fallback":
            print(json.dumps({"step": name, "because_the_engine_step_lost": lost}), flush=True)
        if left < 10:
            summary.append({"step": name, "status": "skipped: budget spent", "seconds": 0})
            continue
        summary.append(run_step(name, step_args, min(limit, left), args.out))
        print(json.dumps(summary[-1]), flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    # The verdict on issue #8's targets from whatever the steps left, cut-off engine runs included.
    verdict = targets.scorecard(args.out)
    (args.out / "targets.json").write_text(json.dumps(verdict, indent=2))
    print(targets.markdown(verdict), flush=True)
    return 0 if all(step["status"] == "passed" for step in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
