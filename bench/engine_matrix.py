"""Engine matrix (issue #8): decode tokens/s over batch x distinct adapters on one node.

  python -m bench.engine --device cuda --preset llama8b --matrix --kernels triton --json matrix.json

One node, built once, every adapter made resident first (loads timed); per batch, base only and
each adapter count <= batch (request i uses adapter i mod N): TTFT, overall and decode tokens/s,
against the bytes a decode step reads (weights + distinct adapters + KV): the byte bound on
adapters/base, the floor at the CUDA copy bandwidth. Then one HF peft mixed batch.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import (_param_bytes, _sync, build_adapters, build_base, build_hf_model, engine_options,
                          time_hf_generate)
from bench.machine import describe

WARM_UP_PROMPT, WARM_UP_TOKENS = 8, 4  # each configuration's batch shape and adapter mix run once untimed
PROMPT_VOCAB = 500  # prompt token ids stay inside the tiny presets' vocabularies


def add_matrix_arguments(parser) -> None:
    def counts(text: str) -> list[int]:
        return sorted({int(part) for part in text.split(",")})

    group = parser.add_argument_group("matrix (--matrix)")
    group.add_argument("--matrix", action="store_true", help="batch x distinct-adapter matrix on one node")
    group.add_argument("--matrix-batches", type=counts, default=[1, 16, 64], help="batch sizes (default 1,16,64)")
    group.add_argument("--matrix-adapters", type=counts, default=[1, 16, 64], help="distinct adapters (1,16,64)")
    group.add_argument("--hf-batch", type=int, default=16, help="batch of the HF peft mixed run")
    group.add_argument("--hf-adapters", type=int, default=16, help="distinct adapters of the HF peft mixed run")
    group.add_argument("--budget-seconds", type=float, default=240.0, help="wall time (%(default)s): then skip")
    group.add_argument("--profile-steps", action="store_true",
                       help="CUDA graphs: each configuration's GPU time per decode step (its last step replayed), "
                            "and the kernels of b1_base, b64_base and b64_a64 (bench/step_profile.py)")
    group.add_argument("--bandwidth-gbs", type=float, help="copy bandwidth for the floor (default: measured on CUDA)")
    group.add_argument("--compare-overlap", action="store_true",
                       help="with overlapped steps on, each configuration of batch >= 16 once more without them "
                            "(the same node: its engine's overlap switched off for that run)")


def resolve_defaults(parser, args):
    """The defaults that depend on --matrix (which sizes a KV cache left unset to its largest batch)."""
    args.repeat = args.repeat or (1 if args.matrix else 3)
    args.hf_gen_len = args.hf_gen_len or (8 if args.matrix else 0)  # HF mixed: ~15 tokens/s on Llama-3-8B
    if not args.matrix:
        args.kv_cache_mb = 512 if args.kv_cache_mb is None else args.kv_cache_mb
    elif args.hf_adapters > args.hf_batch or min(args.matrix_batches + args.matrix_adapters) < 1:
        parser.error("batches and adapter counts must be >= 1, and --hf-adapters <= --hf-batch")
    return args


def plan_configurations(args) -> list[tuple[int, int]]:
    """(batch, adapters) in run order: the largest batch first, whose figures issue #8's targets
    are set on, so a budget that runs out costs the small batches; adapters 0 is base only, run
    first at each batch (the ratios divide by it)."""
    plan = {(batch, count) for batch in args.matrix_batches for count in [0, *args.matrix_adapters] if count <= batch}
    if not args.skip_hf:  # ours at the HF run's batch and adapters, to compare with it
        plan |= {(args.hf_batch, 0), (args.hf_batch, args.hf_adapters)}
    return sorted(plan, key=lambda configuration: (-configuration[0], configuration[1]))


PROFILED_KERNELS = {"b1_base", "b64_base", "b64_a64"}


def configuration_name(batch: int, adapters: int) -> str:
    return f"b{batch}_" + (f"a{adapters}" if adapters else "base")


class MatrixRun:
    """One matrix run: the plan, the budget, and the report that grows as steps finish."""

    def __init__(self, args) -> None:
        self.args, self.plan, self.started = args, plan_configurations(args), time.perf_counter()
        config = {key: value for key, value in vars(args).items() if key not in ("adapters", "batch")}
        self.report = {"machine": describe(), "config": config | {"json": str(args.json)}, "ours_base": [],
                       "ours_adapters": [], "ratios": [], "skipped": [], "failed": []}

    def run(self) -> dict:
        args, report = self.args, self.report
        report["copy_bandwidth_gbs"], report["copy_bandwidth_source"] = copy_bandwidth(args)
        with tempfile.TemporaryDirectory() as tmp:
            self.base, self.adapter_dir = build_base(args.preset, Path(tmp) / "base"), Path(tmp) / "adapters"
            from transformers import AutoConfig

            dtype, count = torch.float32 if args.device == "cpu" else torch.bfloat16, max(a for _, a in self.plan)
            self.names = build_adapters(AutoConfig.from_pretrained(self.base), self.adapter_dir, count, args.rank,
                                        dtype, device=args.device)
            self.progress(f"{count} adapters written")
            self.prompts = torch.randint(0, PROMPT_VOCAB, (max(b for b, _ in self.plan), args.prompt_len)).tolist()
            for step in [self.run_ours] + ([] if args.skip_hf else [self.run_hf_mixed]):
                try:
                    step()
                except Exception as error:  # noqa: BLE001 - a failed step must not lose the other's figures
                    report["failed"].append({"name": step.__name__, "error": repr(error)})
                    self.progress(f"{step.__name__} failed: {error!r}")
        if "model" in report:  # the node was built
            add_byte_figures(report, args)
        report["elapsed_s"] = time.perf_counter() - self.started
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            report["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return report

    def run_ours(self) -> None:
        """Builds the node once, runs every configuration the budget allows, then frees the node."""
        from services.inference.config import InferenceConfig
        from services.inference.node import Node

        if self.budget_left() <= 0:
            return self.skip([configuration_name(b, a) for b, a in self.plan], "budget spent before the node was built")
        max_batch, max_adapters = max(b for b, _ in self.plan), max(a for _, a in self.plan)
        self.report["kv_cache_mb"] = self.args.kv_cache_mb or kv_cache_mb_for(self.base, max_batch, self.args)
        config = InferenceConfig(base_model=self.base, adapter_dir=self.adapter_dir, device=self.args.device,
                                 kv_cache_mb=self.report["kv_cache_mb"], max_num_seqs=max_batch,
                                 adapter_pool_pages=max(64, max_adapters * self.args.rank), max_batched_tokens=8192,
                                 max_model_len=context_tokens(self.args), **engine_options(self.args))
        node = Node.build(config, random_weights=self.args.preset == "llama8b")
        self.report["model"] = model_bytes(node, self.args.rank)
        self.report["node_startup_s"] = node.startup_seconds  # weights, LoRA tuning, graph capture
        self.progress(f"node built: {node.startup_seconds}")
        asyncio.run(self.serve(node))
        del node  # the HF model is built next in this process: give its memory back first
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            self.report["cuda_mb_after_node_freed"] = torch.cuda.memory_allocated() / 2**20

    async def serve(self, node) -> None:
        from bench.step_profile import LastGraphedStep, profile_last_step

        graphs = node.engine.runner.graphs
        tracker = LastGraphedStep(graphs) if self.args.profile_steps and graphs is not None else None
        node.start()
        try:
            self.report["adapter_load"] = await make_resident(node, self.names)
            self.progress(f"{len(self.names)} adapters resident")
            for batch, adapters in self.plan:
                name = configuration_name(batch, adapters)
                if self.budget_left() <= 0:
                    self.skip([name], "budget spent before it started")
                    continue
                keys = [self.names[i % adapters] if adapters else "" for i in range(batch)]
                overlapped_before = node.engine.overlapped_steps
                try:  # wait_for cancels a run that overstays the budget (its requests are aborted)
                    run = await asyncio.wait_for(measure(node, self.prompts[:batch], keys, self.args),
                                                 self.budget_left())
                except TimeoutError:
                    self.skip([name], "budget spent while it ran")
                    continue
                except Exception as error:  # noqa: BLE001 - one failed configuration must not lose the others
                    self.report["failed"].append({"name": name, "error": repr(error)})
                    continue
                run = {"name": name, "batch": batch, "adapters": adapters, **run,
                       "overlapped_steps": node.engine.overlapped_steps - overlapped_before}
                if self.args.compare_overlap and node.engine.overlap and batch >= 16 and self.budget_left() > 0:
                    run["without_overlap"] = await without_overlap(node, self.prompts[:batch], keys, self.args)
                if tracker is not None:
                    profile_last_step(tracker, run, with_kernels=name in PROFILED_KERNELS)
                self.report["ours_adapters" if adapters else "ours_base"].append(run)
                self.progress(f"{name}: decode {run['decode_tokens_per_s'] or math.nan:.1f} tok/s, overall "
                              f"{run['tokens_per_s']:.1f} tok/s, ttft p50 {run['ttft_p50_s']:.3f} s")
        finally:
            node.close()
            runner = node.engine.runner  # graphed vs eager steps: did the decode steps replay graphs?
            self.report["engine_steps"] = {"graph": runner.steps["graph"], "eager": runner.steps["eager"],
                                           "graph_mode": runner.graph_mode, "overlap": node.engine.overlap,
                                           "overlapped": node.engine.overlapped_steps,
                                           "prefill_lora": runner.prefill_lora.summary(),
                                           "prefill_lora_measured_us": runner.prefill_lora.report,
                                           "decode_lora": runner.decode_lora.summary(),
                                           "decode_lora_measured_us": runner.decode_lora.report}

    def run_hf_mixed(self) -> None:
        """One HF peft mixed batch; its decode time is the full run's less a 1-token (prefill) run's."""
        args, batch, count, gen_len = self.args, self.args.hf_batch, self.args.hf_adapters, self.args.hf_gen_len
        if self.budget_left() <= 0:
            return self.skip(["hf_peft_mixed"], "budget spent before it started")
        model = build_hf_model(self.base, self.adapter_dir, self.names[:count], args)
        adapter_names = [self.names[i % count] for i in range(batch)]
        full = time_hf_generate(model, self.prompts[:batch], gen_len, args, adapter_names)
        prefill = time_hf_generate(model, self.prompts[:batch], 1, args, adapter_names, warm_up=False)
        hf = {"name": configuration_name(batch, count), "batch": batch, "adapters": count, "gen_len": gen_len,
              **full, "prefill_seconds": prefill["seconds"],
              "decode_tokens_per_s": _ratio(batch * (gen_len - 1), full["seconds"] - prefill["seconds"])}
        ours = [r for r in self.report["ours_adapters"] if (r["batch"], r["adapters"]) == (batch, count)]
        hf["ours_decode_tokens_per_s"] = ours[0]["decode_tokens_per_s"] if ours else None
        hf["ours_over_hf_mixed"] = _ratio(hf["ours_decode_tokens_per_s"], hf["decode_tokens_per_s"])  # decode/decode
        self.report["hf_peft_mixed"] = hf
        self.progress(f"hf_peft_mixed {hf['name']}: decode {hf['decode_tokens_per_s'] or math.nan:.1f} tok/s, "
                      f"ours/hf {hf['ours_over_hf_mixed'] or math.nan:.2f}")

    def budget_left(self) -> float:
        return self.args.budget_seconds - (time.perf_counter() - self.started)

    def skip(self, names: list[str], reason: str) -> None:
        self.report["skipped"] += [{"name": name, "reason": reason} for name in names]

    def progress(self, message: str) -> None:
        """A line on stderr, and the JSON so far to --json, so a run killed from outside keeps it."""
        print(f"[engine matrix {time.perf_counter() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)
        if self.args.json:
            self.args.json.write_text(json.dumps(self.report, indent=2))


async def make_resident(node, names: list[str]) -> dict:
    """Every adapter into the pool before any run. Fetch + parse (+ pin) is the manager's own figure
    (last_load_ms); the host -> device copy is timed around the pool.load the manager would run."""
    def copy_in(name: str, weights) -> float:  # on the engine thread, as in AdapterManager.try_acquire
        _sync(node.config.device)
        started = time.perf_counter()
        node.pool.load(name, weights)
        _sync(node.config.device)
        return (time.perf_counter() - started) * 1000

    fetch_ms, copy_ms, host_bytes = [], [], []
    for name in names:
        weights = await node.manager.ensure_host(name)
        fetch_ms.append(node.manager.last_load_ms[name])
        copy_ms.append(await node.async_engine.call(lambda: copy_in(name, weights)))
        host_bytes.append(weights.nbytes)
    return {"count": len(names), "bytes_per_adapter": max(host_bytes, default=0), "fetch_parse_ms": spread(fetch_ms),
            "host_to_device_ms": spread(copy_ms), "resident_ms": spread([f + c for f, c in zip(fetch_ms, copy_ms)])}


async def measure(node, prompts: list[list[int]], keys: list[str], args) -> dict:
    await timed_batch(node, [p[:WARM_UP_PROMPT] for p in prompts], keys, min(args.gen_len, WARM_UP_TOKENS))
    runs = [await timed_batch(node, prompts, keys, args.gen_len) for _ in range(args.repeat)]
    # The best run, and every run's decode rate: how far apart repeats land says what a figure is worth.
    return min(runs, key=lambda run: run["seconds"]) | {"repeats_decode_tokens_per_s":
                                                         [run["decode_tokens_per_s"] for run in runs]}


async def without_overlap(node, prompts: list[list[int]], keys: list[str], args) -> dict:
    """measure() with the engine's overlapped steps off (set between runs: no step is in flight)."""
    node.engine.overlap = False
    try:
        run = await measure(node, prompts, keys, args)
    finally:
        node.engine.overlap = True
    return {key: run[key] for key in ("decode_tokens_per_s", "tokens_per_s", "ttft_p50_s")}


async def timed_batch(node, prompts: list[list[int]], keys: list[str], gen_len: int) -> dict:
    """TTFT, overall and decode tokens/s (tokens after the batch's last first token, over the time
    from then to the end: tokens of that same step read just after it count, one step at most)."""
    from services.inference.engine.sampling_params import SamplingParams
    from services.inference.node import Prompt

    sampling = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)

    async def arrivals(prompt: list[int], key: str) -> list[float]:
        return [time.perf_counter() async for output in node.generate(Prompt(token_ids=tuple(prompt)), sampling, key)
                for _ in output.token_ids]

    started = time.perf_counter()
    times = await asyncio.gather(*[arrivals(p, k) for p, k in zip(prompts, keys)])
    firsts = [request[0] for request in times]
    last_first, end, tokens = max(firsts), max(request[-1] for request in times), sum(map(len, times))
    decode_tokens = sum(t > last_first for request in times for t in request)
    return {"tokens": tokens, "seconds": end - started, "tokens_per_s": tokens / (end - started),
            "decode_tokens": decode_tokens, "decode_seconds": end - last_first,
            "decode_tokens_per_s": _ratio(decode_tokens, end - last_first),
            "ttft_p50_s": statistics.median(f - started for f in firsts), "ttft_max_s": max(firsts) - started}


def copy_bandwidth(args, nbytes: int = 2**30, repeats: int = 10) -> tuple[float | None, str | None]:
    """GB/s for the floor: the flag, or a device-to-device copy's bytes read + written per second."""
    if args.bandwidth_gbs or not args.device.startswith("cuda"):
        return args.bandwidth_gbs, "flag" if args.bandwidth_gbs else None
    source, target = torch.empty(2, nbytes, dtype=torch.uint8, device=args.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    target.copy_(source)  # warm-up
    start.record()
    for _ in range(repeats):
        target.copy_(source)
    end.record()
    end.synchronize()
    return 2 * nbytes * repeats / (start.elapsed_time(end) / 1000) / 1e9, "measured"


def kv_cache_mb_for(base: Path, max_batch: int, args) -> int:
    """KV memory for max_batch sequences of prompt + generated tokens, with slack for partial blocks."""
    from services.inference.model.config import load_model_args

    shape = load_model_args(base)
    per_token = 2 * shape.num_layers * shape.num_kv_heads * shape.head_dim * (4 if args.device == "cpu" else 2)
    return math.ceil(max_batch * context_tokens(args) * per_token * 1.1 / 2**20)


def context_tokens(args) -> int:
    """The node's context length: prompt + generated tokens and a block's slack. Also what sizes
    the decode graphs' block tables (and so the attention kernel's partitions)."""
    return args.prompt_len + args.gen_len + 32


def model_bytes(node, rank: int) -> dict:
    """Bytes a decode step reads: weights (an untied input embedding only by rows), per adapter its pages."""
    model, args = node.engine.runner.model, node.args
    weights, embedding = _param_bytes(model), model.model.embed_tokens.weight
    untied_embedding = 0 if args.tie_word_embeddings else embedding.numel() * embedding.element_size()
    pages = sum(t[:, :rank].numel() * t.element_size() for t in (*node.pool.a.values(), *node.pool.b.values()))
    kv = 2 * args.num_layers * args.num_kv_heads * args.head_dim * embedding.element_size()
    return {"base_weight_bytes": weights, "base_bytes_read_per_step": weights - untied_embedding,
            "adapter_bytes": pages, "kv_bytes_per_token": kv}


def add_byte_figures(report: dict, args) -> None:
    """Bytes per decode step and floor tokens/s of each run; adapters/base (decode) against the byte bound."""
    model, bandwidth = report["model"], report["copy_bandwidth_gbs"]
    context = args.prompt_len + args.gen_len / 2  # the mean context over the decode
    weights, base_runs = model["base_bytes_read_per_step"], {run["batch"]: run for run in report["ours_base"]}
    for run in report["ours_base"] + report["ours_adapters"]:
        kv, lora = run["batch"] * context * model["kv_bytes_per_token"], run["adapters"] * model["adapter_bytes"]
        run["bytes_per_decode_step"] = int(weights + lora + kv)
        run["floor_tokens_per_s"] = run["batch"] * bandwidth * 1e9 / run["bytes_per_decode_step"] if bandwidth else None
        run["decode_fraction_of_floor"] = _ratio(run["decode_tokens_per_s"], run["floor_tokens_per_s"])
        if run["adapters"] and (base := base_runs.get(run["batch"])):
            ratios = {"name": run["name"], "batch": run["batch"], "adapters": run["adapters"],
                      "adapters_over_base": _ratio(run["decode_tokens_per_s"], base["decode_tokens_per_s"]),
                      "byte_bound": weights / (weights + lora),
                      # both runs read the KV cache too, which loosens the bound at big batches
                      "byte_bound_with_kv": (weights + kv) / (weights + kv + lora)}
            ratios["fraction_of_byte_bound"] = _ratio(ratios["adapters_over_base"], ratios["byte_bound"])
            report["ratios"].append(ratios)


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "p50": statistics.median(values), "max": max(values)} if values else {}


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator and denominator > 0 else None
