"""Tenants sharing the base model: one tenant's backlog against another tenant's first token.

  python -m bench.tenant_fairness --device cpu --preset small --flood 64 --max-num-seqs 8 --json out.json

One node. Tenant A sends `flood` base-model requests at once (each `prompt-len` prompt tokens,
`gen-len` greedy tokens); right after, tenant B sends one. The node runs at most
`max-num-seqs` sequences, so most of A's requests wait. Run twice on the same prompts: with each
tenant in its own scheduler lane (the Router's cache scope, as the node gets it in service) and
with both in one lane (one queue for the base model, as before lanes). Prints JSON: B's time to
first token in each run, and A's median and last completion time (what the turns cost A).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import describe, report


def run(base: Path, args, lanes: bool) -> dict:
    from services.inference.config import InferenceConfig
    from services.inference.engine.sampling_params import SamplingParams
    from services.inference.node import Node, Prompt

    config = InferenceConfig(base_model=base, device=args.device, kv_cache_mb=args.kv_cache_mb,
                             max_num_seqs=args.max_num_seqs)
    node = Node.build(config)
    sampling = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)
    prompt = Prompt(token_ids=tuple(range(4, 4 + args.prompt_len)))

    async def timed(scope: str, started: float) -> tuple[float, float]:
        first = None
        async for _ in node.generate(prompt, sampling, cache_scope=scope):
            first = first or time.perf_counter()
        return first - started, time.perf_counter() - started

    async def main() -> tuple[tuple[float, float], list[tuple[float, float]]]:
        node.start()
        try:
            await timed("warm-up", time.perf_counter())
            started = time.perf_counter()
            flood = [asyncio.ensure_future(timed("tenant-a", started)) for _ in range(args.flood)]
            await asyncio.sleep(0.05)  # A's requests are queued first
            lonely = await timed("tenant-b" if lanes else "tenant-a", time.perf_counter())
            return lonely, await asyncio.gather(*flood)
        finally:
            node.close()

    (b_ttft, b_done), a_times = asyncio.run(main())
    return {"tenant_b_ttft_ms": b_ttft * 1000, "tenant_b_done_ms": b_done * 1000,
            "tenant_a_done_median_ms": statistics.median(done for _, done in a_times) * 1000,
            "tenant_a_done_last_ms": max(done for _, done in a_times) * 1000}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small", help="services/common/tiny_model.py preset")
    parser.add_argument("--flood", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=16)
    parser.add_argument("--kv-cache-mb", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the report here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from services.common.tiny_model import build_model_folder

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        base = build_model_folder(Path(folder) / "base", preset=args.preset)
        lanes, one_queue = run(base, args, lanes=True), run(base, args, lanes=False)
    result = {"machine": describe(), "args": {k: str(v) for k, v in vars(args).items()},
              "tenant_lanes": lanes, "one_queue": one_queue,
              "tenant_b_ttft_speedup": one_queue["tenant_b_ttft_ms"] / lanes["tenant_b_ttft_ms"]}
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
