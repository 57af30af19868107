"""A cold adapter's way onto the device: parse (safetensors bytes -> the pool's host form) and
the copy into the paged pool, for one rank-`--rank` adapter on all seven projections.

    python -m bench.adapter_load --preset llama8b --device cpu --json out.json

What a request for an adapter that is in no tier pays before its first token, less the fetch
(bench/prefetch.py times that through a Registry). Phases, medians over `--repeat` runs:
- `read_ms`: the file's bytes from the page cache (what a local-folder source does);
- `parse_ms`: `parse_adapter` with the manager's arguments (the pool's dtype, pinned host
  memory on CUDA): checks, the scale fold, the padding, the sha256;
- `pool_load_ms`: `AdapterPool.load` into free pages, device synchronized before and after:
  on CUDA the host -> device copy, on the CPU the page writes.
The adapter's values are random, the shapes those of `--preset` (llama8b: Llama-3-8B, built
in memory; nothing is downloaded). `pages_match_host_form`: the pages hold the parsed values bit
for bit (that those are peft's is tests/inference/test_adapter_host_form.py's and the oracle's).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import _sync, build_adapters, build_base
from bench.machine import describe, report

PRESETS = ("llama8b", "small", "tiny")


def model_shapes(preset: str, folder: Path):
    """The preset's ModelArgs and HF config, from the folder bench.engine builds for it."""
    from transformers import AutoConfig

    from services.inference.model.config import load_model_args

    base = build_base(preset, folder)
    return load_model_args(base), AutoConfig.from_pretrained(base)


def _median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def measure(args) -> dict:
    from services.inference.adapters.pool import AdapterPool
    from services.inference.adapters.weights import parse_adapter

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        model, config = model_shapes(args.preset, Path(tmp) / "base")
        pool = AdapterPool(model, num_pages=args.rank, dtype=dtype, device=device)
        folder = Path(tmp) / build_adapters(config, Path(tmp), 1, args.rank, getattr(torch, args.file_dtype))[0]
        read, parse, load = [], [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            data, config_json = (folder / "adapter_model.safetensors").read_bytes(), \
                (folder / "adapter_config.json").read_text()
            read.append(time.perf_counter() - started)
            started = time.perf_counter()
            weights = parse_adapter(config_json, data, model, pool.dtype, pin_memory=device.type == "cuda")
            parse.append(time.perf_counter() - started)
            if pool.get("bench") is not None:
                pool.evict("bench")
            _sync(str(device))
            started = time.perf_counter()
            pool.load("bench", weights)
            _sync(str(device))
            load.append(time.perf_counter() - started)
        pages = pool.get("bench").pages
        # Checked, not only timed: the pages hold the host form, bit for bit.
        matches = all(torch.equal(pool_side[m][:, pages].cpu(), host_side[m]) for pool_side, host_side
                      in ((pool.a, weights.a), (pool.b, weights.b)) for m in host_side)
    pool_bytes = args.rank * sum(t.shape[0] * t.shape[-1] * t.element_size()
                                 for t in (*pool.a.values(), *pool.b.values()))
    return {"bench": "adapter_load", "machine": describe(), "preset": args.preset, "rank": args.rank,
            "device": str(device), "pool_dtype": args.dtype, "file_dtype": args.file_dtype, "repeat": args.repeat,
            "file_bytes": len(data), "host_bytes": weights.nbytes, "pool_bytes": pool_bytes,
            "read_ms": _median_ms(read), "parse_ms": _median_ms(parse), "pool_load_ms": _median_ms(load),
            "pool_load_gb_per_s": round(pool_bytes / statistics.median(load) / 1e9, 2),
            "pages_match_host_form": matches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="llama8b")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16",
                        help="the pool's dtype (a CUDA node's default is bfloat16)")
    parser.add_argument("--file-dtype", choices=["float32", "bfloat16"], default="bfloat16",
                        help="the dtype the adapter file is saved in")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    report(measure(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
