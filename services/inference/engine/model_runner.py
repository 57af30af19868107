"""ModelRunner: turns a ScheduledBatch into one packed forward and the logits to sample.

It owns the paged KV cache tensors, packs the batch (engine/packed_step.py: sequences
sharing an adapter are contiguous, each run is one LoRA segment) and either replays a
decode graph (engine/decode_graphs.py: decode-only steps, when enabled) or fills a
StepContext and runs the forward eagerly — layers only read the context.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from services.inference.adapters.batch import LoraBatch
from services.inference.adapters.pool import AdapterPool
from services.inference.engine.decode_graphs import CAPTURE, OFF, DecodeGraphs, graph_launch_shapes
from services.inference.engine.packed_step import PackedStep, pack_step
from services.inference.engine.scheduler import ScheduledBatch
from services.inference.engine.sequence import Sequence
from services.inference.kernels import tuning_cache
from services.inference.kernels.decode_lora_tuning import CHOICES as DECODE_LORA_CHOICES
from services.inference.kernels.decode_lora_tuning import DecodeLoraTuning, tune_decode_lora
from services.inference.kernels.prefill_lora import PrefillChoice, unmeasured_prefill_lora, warm_up_prefill_lora
from services.inference.kernels.streams import BESIDE_MODES
from services.inference.model.attention import build_continued_prefills, build_decode_batch, build_fresh_prefills
from services.inference.model.context import StepContext
from services.inference.model.llama import LlamaForCausalLM
from services.inference.startup_phases import StartupPhases


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    args = model.args
    per_token = 2 * args.num_layers * args.num_kv_heads * args.head_dim * torch.finfo(dtype).bits // 8
    return per_token * block_size


# Start-up measurements by what was measured: runners built again in one process (benchmarks,
# tests, a node rebuilt) do not re-time shapes the same GPU has just timed.
_MEASURED: dict[str, DecodeLoraTuning] = {}


def measure_decode_lora(model: LlamaForCausalLM, pool: AdapterPool, device: torch.device, max_batch: int,
                        max_rank: int, beside_modes: tuple[str, ...], cache_dir: Path | None = None
                        ) -> DecodeLoraTuning:
    """The decode graphs' LoRA launches measured at start-up (once per process for the same
    shapes, and once per GPU and software with a cache_dir: kernels/tuning_cache.py), or the
    kernels' defaults with the reason when measuring fails: it only makes steps faster, so a
    node serves without it rather than not at all (the summary it logs says why)."""
    try:
        launches = graph_launch_shapes(model, pool, max_batch, max_rank)
        key = {"shapes": [vars(shape) | {"outs": list(shape.outs)} for shape in launches], "dtype": str(pool.dtype),
               "beside_modes": list(beside_modes), **tuning_cache.environment(device)}
        in_process = json.dumps(key, sort_keys=True) + str(device)
        if in_process not in _MEASURED:
            _MEASURED[in_process] = _measured_or_kept(launches, pool.dtype, device, beside_modes, key, cache_dir)
        return _MEASURED[in_process]
    except Exception as exc:  # noqa: BLE001 - any failure: the defaults stand, and the log says why
        return DecodeLoraTuning(error=f"{type(exc).__name__}: {exc}")
    finally:
        torch.cuda.empty_cache()  # the trials' blocks back to the device before the KV cache claims it


def _measured_or_kept(launches, dtype: torch.dtype, device: torch.device, beside_modes: tuple[str, ...], key: dict,
                      cache_dir: Path | None) -> DecodeLoraTuning:
    path = tuning_cache.entry_path(cache_dir, "decode_lora", key) if cache_dir is not None else None
    kept = tuning_cache.load(path, key) if path is not None else None
    if kept is not None:
        return DecodeLoraTuning.from_json(kept, kept_in=str(path))
    tuning = tune_decode_lora(launches, dtype, device, beside_modes=beside_modes)
    if path is not None:
        tuning_cache.store(path, key, tuning.to_json())
    return tuning


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, pool: AdapterPool, num_kv_blocks: int, block_size: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", kernels: str = "torch",
                 graphs: str = OFF, max_graph_batch: int = 64, max_context: int = 0, max_rank: int = 64,
                 prefill_lora: PrefillChoice | None = None, decode_lora: str = "auto",
                 lora_beside_gemm: str = "auto", tuning_cache_dir: Path | None = None,
                 phases: StartupPhases | None = None) -> None:
        """graphs: decode_graphs.CAPTURE, STATIC or OFF (see resolve_graph_mode); max_context
        bounds the graphs' block tables (default: the model's max_position_embeddings);
        prefill_lora: the kernel of each module's prefill segments (kernels/prefill_lora.py;
        default: the 16-row tiles with Triton kernels, grouped_mm with PyTorch's);
        decode_lora: "auto" measures the captured graphs' LoRA launches
        (kernels/decode_lora_tuning.py), "off" keeps the kernels' defaults; lora_beside_gemm:
        where the graphs run each LoRA against its base GEMM (kernels/streams.py): "auto"
        measures it per shape with decode_lora "auto" (else "off"), or one mode for all;
        tuning_cache_dir: keeps what start-up measures for the next start (tuning_cache.py);
        phases: where the warm-up, tuning and capture phases record their time."""
        self.model, self.pool, self.kernels = model, pool, kernels
        model.use_fused_ops(kernels == "triton")  # the element-wise kernels go with the Triton ones
        self.block_size, self.device = block_size, torch.device(device)
        self.steps = Counter()  # "graph" / "eager" steps run (metrics, benchmarks, tests)
        shapes = pool.shapes()
        self.prefill_lora = prefill_lora or unmeasured_prefill_lora(kernels, shapes)
        phases = phases or StartupPhases(self.device)
        if kernels == "triton" and self.device.type == "cuda":  # compiles now, not in a request's prefill
            with phases.phase("prefill LoRA warm-up"):
                warm_up_prefill_lora(self.prefill_lora, shapes, pool.dtype, self.device, max_rank)
        if decode_lora not in DECODE_LORA_CHOICES:
            raise ValueError(f"decode_lora must be one of {', '.join(DECODE_LORA_CHOICES)}, got {decode_lora!r}")
        self.decode_lora = DecodeLoraTuning()
        if graphs == CAPTURE and decode_lora == "auto":  # timings mean something on a GPU only
            with phases.phase("decode LoRA tuning"):
                self.decode_lora = measure_decode_lora(model, pool, self.device, max_graph_batch, max_rank,
                                                       BESIDE_MODES if lora_beside_gemm == "auto" else (),
                                                       tuning_cache_dir)
        args = model.args
        # Graphed steps pad their batch with rows whose K/V go to one extra block no sequence owns.
        scratch_blocks = 1 if graphs != OFF else 0
        cache_blocks = num_kv_blocks + scratch_blocks
        for layer in model.attention_layers():
            layer.k_cache = torch.zeros(cache_blocks, block_size, args.num_kv_heads, args.head_dim,
                                        dtype=dtype, device=device)
            layer.v_cache = torch.zeros_like(layer.k_cache)
        self.graphs = None
        if graphs != OFF:
            with phases.phase("decode graphs"):
                self.graphs = DecodeGraphs(model, pool, mode=graphs, max_batch=max_graph_batch, max_rank=max_rank,
                                           max_context=max_context or args.max_position_embeddings,
                                           block_size=block_size, scratch_slot=num_kv_blocks * block_size,
                                           device=self.device, tuning=self.decode_lora,
                                           lora_beside_gemm=lora_beside_gemm)
                self.graphs.capture()

    @property
    def graph_mode(self) -> str:
        """decode_graphs.CAPTURE, STATIC or OFF."""
        return self.graphs.mode if self.graphs is not None else OFF

    def run(self, batch: ScheduledBatch,
            input_ids: torch.Tensor | None = None) -> tuple[list[Sequence], torch.Tensor]:
        """Runs one step; returns the sequences that get a token and their logits [N, V].
        input_ids: the step's token ids on the device, in place of the sequences' own (an
        overlapped decode step's, one per sequence of `batch` in its order: engine/overlap.py)."""
        packed = pack_step(batch, self.pool, self.block_size)
        if input_ids is not None and (packed.sampled != batch.seqs or not packed.is_decode_only):
            # pack_step orders by adapter; overlap.py hands over a batch in that order already
            raise RuntimeError("device input ids need a decode-only batch in packing order")
        graphed = self.graphs.choose(packed) if self.graphs is not None else None
        if graphed is not None:
            self.steps["graph"] += 1
            return packed.sampled, self.graphs.run(graphed, packed, input_ids)
        self.steps["eager"] += 1
        return packed.sampled, self._run_eager(packed, input_ids)

    def _run_eager(self, packed: PackedStep, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        device = self.device
        padded_tables, block_tables = _block_tables_on(device, packed.block_tables)
        ctx = StepContext(
            positions=torch.tensor(packed.positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(packed.slots, dtype=torch.int64, device=device),
            cu_seqlens=packed.cu_seqlens, context_lens=packed.context_lens, block_tables=block_tables,
            logits_indices=torch.tensor(packed.logits_rows, dtype=torch.int64, device=device),
            lora=LoraBatch(packed.groups, self.pool.a, self.pool.b, len(packed.tokens), self.kernels,
                           self.prefill_lora.paths)
            if packed.groups else None,
            block_size=self.block_size)
        if self.kernels == "triton":  # the GPU kernels: paged decode, varlen fresh prefills, paged prefills
            ctx.decode = build_decode_batch(ctx, padded_tables=padded_tables)
            ctx.prefill = build_fresh_prefills(ctx)
            ctx.continued = build_continued_prefills(ctx, padded_tables)
        else:
            ctx.decode = build_decode_batch(ctx)
        if input_ids is None:
            input_ids = torch.tensor(packed.tokens, dtype=torch.int64, device=device)
        hidden = self.model(input_ids, ctx)
        if not packed.logits_rows:
            return torch.empty(0)
        return self.model.compute_logits(hidden[ctx.logits_indices])


def _block_tables_on(device: torch.device, tables: list[list[int]]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The step's block tables on the device in one padded copy [S, max_blocks] (a copy per
    sequence would be S host-to-device transfers every step on a GPU), and a view of each
    sequence's own blocks."""
    width = max(len(t) for t in tables)
    padded = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64).to(device)
    return padded, [padded[i, :len(t)] for i, t in enumerate(tables)]
