"""Host work per decode step: what the CPU does around the model, which a GPU cannot hide.

  python -m bench.host_overhead --batch 64 --steps 64 --json out.json

On a GPU a graphed Llama-3-8B decode step at batch 64 is predicted at 7-9 ms; everything the
engine does in Python around it (schedule, pack, sample, postprocess, detokenize, build the
outputs) adds to that serially. Measured here with the tiny model on any machine, so the
figure can be tracked on CPU: per step, the time outside the model runner (greedy sampling:
a sampled row adds a few kernel launches on a GPU), and the graphed step's host side
(filling its static buffers, then the upload, here a plain CPU copy where a GPU node does a
pinned asynchronous one) for 1, 16 and `batch` adapters.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import describe, report


def engine_host_ms(batch: int, steps: int, folder: Path) -> dict:
    """A batch of decodes through LLMEngine.step: ms per step in the runner and outside it."""
    from services.inference.config import InferenceConfig
    from services.inference.engine.sampling_params import SamplingParams
    from services.inference.node import Node

    # A local adapter folder (empty): without one the node would reach for the Registry's gRPC
    # stubs, which the GPU machine's older grpcio refuses to import.
    adapters = folder.parent / "no_adapters"
    adapters.mkdir(exist_ok=True)
    node = Node.build(InferenceConfig(base_model=folder, adapter_dir=adapters, kv_cache_mb=64, max_num_seqs=batch,
                                      max_batched_tokens=max(2048, batch * 32)))
    engine, runner = node.engine, node.engine.runner
    in_runner = []
    run = runner.run

    def timed(*args, **kwargs):
        started = time.perf_counter()
        result = run(*args, **kwargs)
        in_runner.append(time.perf_counter() - started)
        return result

    runner.run = timed
    sampling = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    for _ in range(batch):
        engine.add(list(range(5, 37)), sampling)
    engine.step()  # the prefill: not a decode step
    in_runner.clear()
    per_step = []
    while engine.has_work:
        started = time.perf_counter()
        engine.step()
        per_step.append(time.perf_counter() - started)
    outside = [total - model for total, model in zip(per_step, in_runner)]
    return {"batch": batch, "decode_steps": len(per_step), "runner_ms": 1000 * statistics.median(in_runner),
            "outside_runner_ms": 1000 * statistics.median(outside)}


def graph_fill_ms(batch: int, adapters: int, folder: Path, repeats: int = 200) -> dict:
    """The graphed decode step's host side for `batch` decodes over `adapters` rank-16 adapters."""
    from services.inference.adapters.batch import AdapterSegments
    from services.inference.adapters.pool import AdapterPool
    from services.inference.engine.decode_graphs import STATIC, DecodeGraphs
    from services.inference.engine.packed_step import PackedStep
    from services.inference.kernels.reference import Segment
    from services.inference.model.config import LORA_MODULES
    from services.inference.model.loader import random_model

    model, args = random_model(folder, dtype=torch.float32, device="cpu")
    graphs = DecodeGraphs(model, AdapterPool(args, adapters * 16), mode=STATIC, max_batch=batch, max_rank=16,
                          max_context=8192, block_size=16, scratch_slot=0, device=torch.device("cpu"))
    packed = PackedStep()
    for i in range(batch):  # sequences at 600 tokens of context
        packed.tokens.append(i)
        packed.positions.append(600)
        packed.slots.append(i * 1000)
        packed.context_lens.append(601)
        packed.block_tables.append(list(range(i * 40, i * 40 + 38)))
        packed.cu_seqlens.append(i + 1)
        packed.logits_rows.append(i)
        pages = tuple(range((i % adapters) * 16, (i % adapters) * 16 + 16))
        packed.groups.append(AdapterSegments([Segment(i, i + 1, torch.tensor(pages), 2.0, pages)],
                                             frozenset(LORA_MODULES)))
    packed.sampled = [None] * batch
    step = graphs.choose(packed)
    started = time.perf_counter()
    for _ in range(repeats):
        graphs.prepare(step, packed)
    return {"batch": batch, "adapters": adapters, "fill_and_upload_ms": 1000 * (time.perf_counter() - started) / repeats,
            "buffer_words": step.layout.size, "tile_capacity": step.layout.tile_capacity}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=64, help="decode steps timed")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from services.common.tiny_model import build_model_folder

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_model_folder(Path(tmp) / "tiny", preset="tiny")
        result = {"machine": describe(), "engine": engine_host_ms(args.batch, args.steps, folder),
                  "graph_fill": [graph_fill_ms(args.batch, count, folder)
                                 for count in sorted({c for c in (1, 16, args.batch) if c <= args.batch})]}
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
