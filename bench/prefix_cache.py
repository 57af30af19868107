"""Prefix caching: time to first token when requests share a long prompt prefix.

  python -m bench.prefix_cache --device cpu --preset small --prefix-len 512 --suffix-len 16 \\
      --requests 16 --json out.json

Many tenants send one long system prompt (or few-shot block) ahead of every question. One
node, one run with `--prefix-caching on` and one with it off, the same prompts: a shared
prefix of `prefix-len` random tokens, then `suffix-len` tokens of each request's own, sent one
after another (so each request's time to first token is its prefill alone), `gen-len` greedy
tokens each. Prints JSON: median and mean time to first token, the prompt tokens computed and
read from the cache (the node's own counters), and the speed-up of the first token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import describe, report


def run(base: Path, prompts: list[list[int]], args, prefix_caching: bool) -> dict:
    from services.inference.config import InferenceConfig
    from services.inference.engine.sampling_params import SamplingParams
    from services.inference.node import Node, Prompt

    config = InferenceConfig(base_model=base, device=args.device, kv_cache_mb=args.kv_cache_mb,
                             prefix_caching=prefix_caching, max_batched_tokens=max(2048, len(prompts[0])))
    node = Node.build(config)
    sampling = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)

    async def first_token_seconds(prompt: list[int]) -> float:
        started, first = time.perf_counter(), None
        async for _ in node.generate(Prompt(token_ids=tuple(prompt)), sampling):
            first = first or time.perf_counter()
        return first - started

    blocks = node.engine.scheduler.block_manager

    async def main() -> tuple[list[float], tuple[int, int]]:
        node.start()
        try:
            await first_token_seconds([1, 2, 3])  # warm-up, sharing nothing with the prompts
            before = blocks.prompt_tokens_computed, blocks.prompt_tokens_cached
            return [await first_token_seconds(prompt) for prompt in prompts], before
        finally:
            node.close()

    seconds, (computed, cached) = asyncio.run(main())
    return {"ttft_median_ms": statistics.median(seconds) * 1000, "ttft_mean_ms": statistics.mean(seconds) * 1000,
            "ttft_first_request_ms": seconds[0] * 1000,
            "prompt_tokens_computed": blocks.prompt_tokens_computed - computed,
            "prompt_tokens_cached": blocks.prompt_tokens_cached - cached}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="small", help="services/common/tiny_model.py preset")
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--suffix-len", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--gen-len", type=int, default=4)
    parser.add_argument("--kv-cache-mb", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from services.common.tiny_model import build_model_folder

    args = parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as folder:
        base = build_model_folder(Path(folder) / "base", preset=args.preset)
        vocab = json.loads((base / "config.json").read_text())["vocab_size"]
        prefix = torch.randint(4, vocab, (args.prefix_len,), generator=generator).tolist()
        prompts = [prefix + torch.randint(4, vocab, (args.suffix_len,), generator=generator).tolist()
                   for _ in range(args.requests)]
        on, off = run(base, prompts, args, True), run(base, prompts, args, False)
    result = {"machine": describe(), "args": {k: str(v) for k, v in vars(args).items()},
              "prefix_caching_on": on, "prefix_caching_off": off,
              "ttft_speedup_median": off["ttft_median_ms"] / on["ttft_median_ms"]}
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
