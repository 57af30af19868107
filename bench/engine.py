"""Engine throughput: our engine with N distinct adapters vs base-only vs HF peft.

  python -m bench.engine --device cpu --preset small --adapters 16 --batch 16 \\
      --prompt-len 64 --gen-len 32 --json out.json

One run measures (a) our engine, each of the `batch` requests with one of N distinct
rank-r adapters on all seven projections; (b) our engine, base model only; (c) HF peft
`generate(adapter_names=...)` mixed batch; (d) HF peft, one adapter for the whole batch —
same prompts, greedy, fixed length. Prints JSON: tokens/s, ratios, peak memory, and the
byte bound base_bytes / (base_bytes + adapter_bytes) that caps (a)/(b) when decode is
memory-bound.

`--matrix`: batch x distinct-adapter configurations on one node instead (bench/engine_matrix.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import describe, report

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_base(preset: str, folder: Path) -> Path:
    from services.common.tiny_model import build_model_folder, build_tokenizer

    if preset != "llama8b":
        return build_model_folder(folder, preset=preset)
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, max_position_embeddings=8192,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    build_tokenizer(8192).save_pretrained(folder)
    return folder


def projection_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each LoRA target of a Llama-family config."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    hidden, inner = config.hidden_size, config.intermediate_size
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (q, hidden),
            "gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}


def build_adapters(config, folder: Path, count: int, rank: int, dtype: torch.dtype,
                   device: str = "cpu") -> list[str]:
    """`count` random rank-`rank` PEFT adapters on all seven projections, written directly.

    The same files peft saves, without a peft model per adapter. Values are drawn on `device`:
    64 Llama-3-8B-shaped adapters are 2.7G random numbers (5.4 GB in bf16), slow on a CPU and
    instant on a GPU. Each adapter gets its own draws: distinct bytes that decode must read.
    """
    from safetensors.torch import save_file

    shapes, names = projection_shapes(config), []
    generator = torch.Generator(device=device).manual_seed(1234)

    def draw(rows: int, cols: int, scale: float) -> torch.Tensor:  # on `device`, then to the CPU for safetensors
        return (torch.randn(rows, cols, generator=generator, device=device) * scale).to(dtype).cpu()

    for i in range(count):
        tensors = {}
        for layer in range(config.num_hidden_layers):
            for module, (fan_in, fan_out) in shapes.items():
                block = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
                key = f"base_model.model.model.layers.{layer}.{block}.{module}"
                tensors[f"{key}.lora_A.weight"] = draw(rank, fan_in, fan_in ** -0.5)
                tensors[f"{key}.lora_B.weight"] = draw(fan_out, rank, 0.01)
        target = folder / f"a{i}"
        target.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(target / "adapter_model.safetensors"))
        (target / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ALL_MODULES,
            "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False,
            "base_model_name_or_path": str(folder.parent / "base")}))
        names.append(f"a{i}")
    return names


def engine_options(args) -> dict:
    """InferenceConfig fields chosen by flags: the kernels, CUDA graphs when asked, and the
    largest rank this run's adapters have (each rank padding beyond it would be one more set
    of decode graphs captured and kernels compiled for nothing). No prefix caching: every timed
    run repeats the same prompts, whose KV it would read back instead of computing it as HF does."""
    return {"kernels": args.kernels, "max_adapter_rank": args.rank, "prefix_caching": False,
            "overlap_steps": args.overlap_steps, "decode_lora_beside_gemm": args.lora_beside_gemm,
            "decode_lora_tuning": args.decode_lora_tuning,
            **({"cuda_graphs": args.cuda_graphs} if args.cuda_graphs else {})}


def run_ours(base: Path, adapters: Path, names: list[str], prompts: list[list[int]], gen_len: int, args,
             use_adapters: bool) -> dict:
    from services.inference.config import InferenceConfig
    from services.inference.engine.sampling_params import SamplingParams
    from services.inference.node import Node, Prompt

    config = InferenceConfig(base_model=base, adapter_dir=adapters, device=args.device, kv_cache_mb=args.kv_cache_mb,
                             **engine_options(args),
                             adapter_pool_pages=max(64, len(names) * args.rank), max_num_seqs=len(prompts),
                             max_batched_tokens=max(2048, len(prompts) * args.prompt_len))
    node = Node.build(config, random_weights=args.preset == "llama8b")
    sampling = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)

    async def one(prompt, key):
        first = None
        count = 0
        async for output in node.generate(Prompt(token_ids=tuple(prompt)), sampling, key):
            first = first or time.perf_counter()
            count += len(output.token_ids)
        return first, count

    async def main():
        node.start()
        try:
            keys = [names[i % len(names)] if use_adapters else "" for i in range(len(prompts))]
            for key in set(keys) - {""}:  # measure serving, not the first load
                await node.manager.ensure_host(key)
            await asyncio.gather(*[one(p[:8], k) for p, k in zip(prompts, keys)])  # warm-up
            best = None
            for _ in range(args.repeat):
                started = time.perf_counter()
                results = await asyncio.gather(*[one(p, k) for p, k in zip(prompts, keys)])
                elapsed = time.perf_counter() - started
                if best is None or elapsed < best[0]:
                    best = (elapsed, results, started)
            return best
        finally:
            node.close()

    elapsed, results, started = asyncio.run(main())
    tokens = sum(count for _, count in results)
    ttft = sorted(first - started for first, _ in results)
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
            "ttft_p50_s": ttft[len(ttft) // 2], "base_weight_bytes": _param_bytes(node.engine.runner.model)}


def run_hf(base: Path, adapters: Path, names: list[str], prompts: list[list[int]], gen_len: int, args,
           mixed: bool) -> dict:
    model = build_hf_model(base, adapters, names if mixed else names[:1], args)
    adapter_names = [names[i % len(names)] for i in range(len(prompts))] if mixed else None
    return time_hf_generate(model, prompts, gen_len, args, adapter_names)


def build_hf_model(base: Path, adapters: Path, names: list[str], args):
    """The HF base model with the peft adapters `names` loaded (the first one active)."""
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    if args.preset == "llama8b":
        with torch.device(args.device):  # random init of 8B parameters: seconds on a GPU, minutes on a CPU
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(base), dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(args.device)
    model = PeftModel.from_pretrained(model, adapters / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters / name, adapter_name=name)
    return model.eval()


def time_hf_generate(model, prompts: list[list[int]], gen_len: int, args, adapter_names: list[str] | None,
                     warm_up: bool = True) -> dict:
    """Greedy generate of exactly gen_len new tokens per prompt; the best of args.repeat runs."""
    ids = torch.tensor(prompts, device=args.device)
    kwargs = {"max_new_tokens": gen_len, "min_new_tokens": gen_len, "do_sample": False,
              "attention_mask": torch.ones_like(ids)}
    if adapter_names is not None:
        kwargs["adapter_names"] = adapter_names
    with torch.no_grad():
        if warm_up:
            model.generate(ids[:, :8], **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2,
                                          "attention_mask": torch.ones_like(ids[:, :8])})
        elapsed = float("inf")
        for _ in range(args.repeat):
            _sync(args.device)
            started = time.perf_counter()
            out = model.generate(ids, **kwargs)
            _sync(args.device)
            elapsed = min(elapsed, time.perf_counter() - started)
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def adapter_bytes(adapters: Path, names: list[str], dtype_bytes: int) -> int:
    from safetensors import safe_open

    total = 0
    for name in names:
        with safe_open(str(adapters / name / "adapter_model.safetensors"), "pt") as reader:
            total += sum(reader.get_slice(k).get_shape()[0] * reader.get_slice(k).get_shape()[1] for k in reader.keys())
    return total * dtype_bytes


def parse_args(argv=None) -> argparse.Namespace:
    from bench.engine_matrix import add_matrix_arguments, resolve_defaults

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", choices=["tiny", "small", "llama8b"], default="small")
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--kv-cache-mb", type=int, help="KV cache MiB (default 512; --matrix: fits the largest batch)")
    parser.add_argument("--kernels", default="auto", choices=["auto", "torch", "triton"], help="our engine's kernels")
    parser.add_argument("--cuda-graphs", choices=["auto", "on", "off"],
                        help="our engine's CUDA graphs (default auto: on with Triton kernels on CUDA)")
    parser.add_argument("--overlap-steps", choices=["auto", "on", "off"], default="auto",
                        help="our engine's overlapped decode steps (default auto: on with captured CUDA graphs)")
    parser.add_argument("--lora-beside-gemm", choices=["auto", "off", "shrink", "lora"], default="auto",
                        help="where our decode graphs run each LoRA against its GEMM (default auto: measured)")
    parser.add_argument("--decode-lora-tuning", choices=["auto", "off"], default="auto",
                        help="our decode graphs' LoRA launches: measured at start-up (auto) or the kernels' defaults")
    parser.add_argument("--hf-gen-len", type=int, default=0, help="new tokens for the HF peft runs (0: --gen-len; "
                        "8 with --matrix); HF mixed batches are slow on big models")
    parser.add_argument("--skip-hf", action="store_true", help="only our engine")
    parser.add_argument("--repeat", type=int, help="timed runs per variant, the best kept: shared 2-core machines "
                        "are noisy (default 3; 1 with --matrix)")
    parser.add_argument("--json", type=Path, help="also write the JSON here")
    add_matrix_arguments(parser)
    return resolve_defaults(parser, parser.parse_args(argv))


def run_comparison(args) -> dict:
    """One batch: our engine with adapters, base only, HF peft mixed and single (see the docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = build_base(args.preset, root / "base")
        from transformers import AutoConfig

        adapter_dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
        names = build_adapters(AutoConfig.from_pretrained(base), root / "adapters", args.adapters, args.rank,
                               adapter_dtype, device=args.device)
        vocab = 500
        prompts = torch.randint(0, vocab, (args.batch, args.prompt_len)).tolist()
        result = {"machine": describe(), "config": vars(args) | {"json": str(args.json)}}
        result["ours_adapters"] = run_ours(base, root / "adapters", names, prompts, args.gen_len, args, True)
        result["ours_base"] = run_ours(base, root / "adapters", names, prompts, args.gen_len, args, False)
        if not args.skip_hf:
            hf_gen_len = args.hf_gen_len or args.gen_len
            result["hf_peft_mixed"] = run_hf(base, root / "adapters", names, prompts, hf_gen_len, args, True)
            result["hf_peft_single"] = run_hf(base, root / "adapters", names, prompts, hf_gen_len, args, False)
        dtype_bytes = 4 if args.device == "cpu" else 2
        base_bytes = result["ours_base"]["base_weight_bytes"]
        lora_bytes = adapter_bytes(root / "adapters", names[:min(args.adapters, args.batch)], dtype_bytes)
        ratios = {"adapters_over_base": result["ours_adapters"]["tokens_per_s"] / result["ours_base"]["tokens_per_s"],
                  "byte_bound": base_bytes / (base_bytes + lora_bytes)}
        ratios["fraction_of_byte_bound"] = ratios["adapters_over_base"] / ratios["byte_bound"]
        if not args.skip_hf:
            ratios["ours_over_hf_mixed"] = (result["ours_adapters"]["tokens_per_s"]
                                            / result["hf_peft_mixed"]["tokens_per_s"])
            ratios["ours_over_hf_single"] = (result["ours_adapters"]["tokens_per_s"]
                                             / result["hf_peft_single"]["tokens_per_s"])
        result["ratios"] = ratios
        result["adapter_bytes_distinct"] = lora_bytes
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if torch.cuda.is_available():
            result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.manual_seed(0)
    if args.matrix:
        from bench.engine_matrix import MatrixRun

        result = MatrixRun(args).run()
    else:
        result = run_comparison(args)
    report(result, args.json)
    return 1 if result.get("failed") else 0


if __name__ == "__main__":
    sys.exit(main())
