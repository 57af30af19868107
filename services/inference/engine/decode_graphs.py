"""Decode steps replayed from CUDA graphs, over static buffers.

Why: a Llama-3-8B decode step launches ~1,500 kernels (32 layers x 7 projections with their
LoRA shrink and expand, attention, norms, rotary...). At a few µs of launch overhead each,
launching alone costs about as much as the step's whole byte floor (~6 ms at batch 64);
a graph replays them all with one launch.

What makes the step capturable:
- every per-step input has a fixed place in one int32 device buffer (graph_layout.py),
  filled on the host in a pinned twin and moved by one asynchronous copy: no host sync and
  no allocation per step;
- shapes depend only on the graph's batch size, rank padding (block_r) and tile capacity
  (below). A batch is padded up to the next captured size: padding rows read token 0 at
  position 0, write their K/V to a scratch slot no sequence owns, attend over a context of 0
  tokens (the kernel returns zeros) and belong to no LoRA tile;
- every projection has a LoRA plan of a fixed tile capacity; projections that no adapter of
  the step targets get empty tiles, whose programs return at once. Steps without adapters
  replay a base-only graph with no LoRA kernels at all.
Prefill and mixed steps, and batches above the largest size, run eagerly.

Tile-capacity buckets: `batch` tiles always suffice (a tile holds >= 1 token), but few
adapters make few tiles: at batch 64 over 16 adapters 48 of 64 tiles are empty, and the
shrink's split-K, chosen from the capacity, is 3 where the 16 real tiles would take 11 (the
H200 ran LoRA at 2.2 ms a step where the kernel bench's same shapes take ~1.2). So each
(batch, block_r) has variants of capacity tile_capacities(batch), and a step takes the
smallest that holds its tiles (step_tiles: a host-side bound from the step's adapters).
Variants for max_batch 64 and max_rank 64: 11 batch sizes x (base-only + 3 rank paddings) =
44 before the buckets; 11 base-only + 21 (batch, capacity) pairs x 3 paddings = 74 after:
~1.7x the start-up capture and the graphs' own objects, while the input buffer and the
memory pool stay the size the largest variant needs (smaller capacities fit inside both).

Modes: "capture" records one graph per variant (batch size, block_r, tile capacity) at
start-up, largest first, all in one memory pool (only one replays at a time). "static" runs
the same body on the same buffers without capturing: the twin that tests check against HF +
peft on CPU under TRITON_INTERPRET, so everything but the capture itself is verified without
a GPU.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from services.inference.adapters.batch import AdapterSegments, segments_by_targets
from services.inference.adapters.pool import AdapterPool
from services.inference.config import GRAPH_MODES
from services.inference.engine.graph_layout import GraphLayout, float_view, int_view
from services.inference.engine.packed_step import PackedStep
from services.inference.kernels.decode_lora_tuning import DecodeLoraTuning, LaunchShape, launch_shapes
from services.inference.kernels.streams import CHOICES as BESIDE_CHOICES
from services.inference.kernels.streams import linear_with_lora, side_stream_for
from services.inference.kernels.triton_lora import (DEFAULT_BLOCK_M, LoraSlice, LoraTritonPlan, SlicedLora,
                                                    rank_paddings, tile_segments)
from services.inference.model.attention import DecodeBatch
from services.inference.model.context import StepContext
from services.inference.model.llama import LlamaForCausalLM

CAPTURE, STATIC, OFF = "capture", "static", "off"


def resolve_graph_mode(requested: str, device: str | torch.device, kernels: str) -> str:
    """CAPTURE, STATIC or OFF for --cuda-graphs `requested` (config.GRAPH_MODES)."""
    if requested not in GRAPH_MODES:
        raise ValueError(f"--cuda-graphs must be one of {', '.join(GRAPH_MODES)}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return CAPTURE if on_cuda and kernels == "triton" else OFF
    if requested in ("on", STATIC) and kernels != "triton":
        raise ValueError(f"--cuda-graphs {requested} needs --kernels triton (the PyTorch LoRA and attention "
                         "paths build per-step tensors on the host, which a graph cannot replay)")
    if requested == "on" and not on_cuda:
        raise ValueError("--cuda-graphs on needs a CUDA device (static runs the same step without capture)")
    return CAPTURE if requested == "on" else requested


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 8 up to max_batch (and max_batch): a padded batch
    wastes at most 7 rows, whose cost is small next to the weights every row shares."""
    sizes = {s for s in (1, 2, 4, 8) if s <= max_batch} | set(range(16, max_batch + 1, 8)) | {max_batch}
    return sorted(sizes)


MIN_BUCKET = 16


def tile_capacities(batch: int) -> list[int]:
    """The tile capacities of a batch's LoRA variants: powers of two from 16 below it, then the
    batch itself. Powers of two leave at most half a step's capacity empty, so the split-K
    chosen from the capacity is at least about half what its real tiles alone would get; below
    16 tiles the split is at or near its cap of 16 already, so smaller buckets would add
    variants for nothing. Every batch above 16 gets its buckets: 74 variants instead of 44
    (module docstring) is under twice the capture, so no batch is left out to save it."""
    return [c for c in (MIN_BUCKET << i for i in range(batch.bit_length())) if c < batch] + [batch]


def step_tiles(groups: list[AdapterSegments], block_m: int) -> int:
    """An upper bound on the tiles any projection's plan has for these adapters' segments:
    Σ over adapters of ceil(its rows / block_m), pooling an adapter's segments by the key
    tile_segments pools them by (pages, scale). Exact for a projection every adapter targets;
    one a subset targets has fewer. Host lists only: no tiles are built for it."""
    rows: dict[tuple[tuple[int, ...], float], int] = {}
    for group in groups:
        for segment in group.segments:
            if segment.end > segment.start:
                key = (segment.page_ids(), float(segment.scale))
                rows[key] = rows.get(key, 0) + segment.end - segment.start
    return sum(-(-n // block_m) for n in rows.values())


class PlannedLora:
    """The layers' LoRA seam (`linear`) over fixed Triton plans: one per projection, each launch
    with the knobs start-up measured for its shape (kernels/decode_lora_tuning.py), read while
    the graph is captured, so a replay pays nothing for them. With a side stream, the LoRA or
    its shrink may run beside the base GEMM (kernels/streams.py): two branches of the graph."""

    def __init__(self, plans: dict[str, LoraTritonPlan], pool: AdapterPool,
                 tuning: DecodeLoraTuning | None = None, side_stream: torch.cuda.Stream | None = None,
                 beside: str = "auto") -> None:
        """beside: a mode of kernels/streams.BESIDE_MODES for every launch, or "auto": the tuning's."""
        self.plans, self.pool, self.tuning = plans, pool, tuning or DecodeLoraTuning()
        self.side_stream, self.beside = side_stream, beside

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: int,
               modules: list[str], columns: list[int]) -> torch.Tensor:
        """F.linear(x, weight, bias) plus every module's LoRA on its columns, in one launch pair:
        the plans share a capacity, and a module no adapter of the step targets has empty
        tiles, whose programs return at once."""
        slices = [LoraSlice(self.pool.a[m][layer], self.pool.b[m][layer], self.plans[m], column)
                  for m, column in zip(modules, columns)]
        outs = tuple(piece.b_pages.shape[1] for piece in slices)
        shape = LaunchShape(slices[0].plan.num_tiles, slices[0].plan.block_r, x.shape[1], outs)
        mode = self.tuning.beside_mode(shape) if self.beside == "auto" else self.beside
        return linear_with_lora(x, weight, bias, SlicedLora(x, slices, **self.tuning.knobs(shape)), mode,
                                self.side_stream)


def graph_launch_shapes(model: LlamaForCausalLM, pool: AdapterPool, max_batch: int, max_rank: int
                        ) -> list[LaunchShape]:
    """Every LoRA launch shape the decode graphs for these limits capture (what start-up tunes)."""
    shapes = pool.shapes()
    capacities = {c for batch in graph_batch_sizes(max_batch) for c in tile_capacities(batch)}
    groups = [[shapes[m] for m in group] for group in model.lora_launch_groups() if all(m in shapes for m in group)]
    return launch_shapes(groups, sorted(capacities), rank_paddings(max_rank))


@dataclass
class GraphedStep:
    """One (batch, block_r, tile capacity) variant: its layout, static views, and graph once captured."""

    layout: GraphLayout
    context: StepContext
    token_ids: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None


class DecodeGraphs:
    def __init__(self, model: LlamaForCausalLM, pool: AdapterPool, *, mode: str, max_batch: int, max_rank: int,
                 max_context: int, block_size: int, scratch_slot: int, device: torch.device,
                 tuning: DecodeLoraTuning | None = None, lora_beside_gemm: str = "auto") -> None:
        """tuning: the LoRA launch knobs per shape (graph_launch_shapes; default: the kernels' own);
        lora_beside_gemm: where each LoRA runs against its base GEMM (kernels/streams.py), one
        mode for all, or "auto": the tuning's per shape (without one: "off")."""
        if mode not in (CAPTURE, STATIC):
            raise ValueError(f"mode must be {CAPTURE} or {STATIC}, got {mode!r}")
        self.model, self.pool, self.mode, self.device = model, pool, mode, device
        self.tuning = tuning or DecodeLoraTuning()
        if lora_beside_gemm not in BESIDE_CHOICES:
            raise ValueError(f"lora_beside_gemm must be one of {', '.join(BESIDE_CHOICES)}, "
                             f"got {lora_beside_gemm!r}")
        self.lora_beside_gemm = lora_beside_gemm
        self.side_stream = side_stream_for(device, lora_beside_gemm != "off")
        self.block_size, self.scratch_slot = block_size, scratch_slot
        self.sizes = graph_batch_sizes(max_batch)
        self.paddings = rank_paddings(max_rank)
        self.table_width = -(-max_context // block_size)
        modules = tuple(pool.a)
        self.capacities = {b: tile_capacities(b) for b in self.sizes}
        layouts = [GraphLayout(b, self.table_width, modules, DEFAULT_BLOCK_M, None) for b in self.sizes]
        layouts += [GraphLayout(b, self.table_width, modules, DEFAULT_BLOCK_M, r, c)
                    for b in self.sizes for r in self.paddings for c in self.capacities[b]]
        size = max(layout.size for layout in layouts)
        # One device buffer for every variant (only one runs at a time), and its host twin; one
        # logits buffer too (a [batch, vocab] float32 output per variant would be ~0.8 GB for
        # Llama 3's vocabulary over 74 variants).
        self.buffer = torch.zeros(size, dtype=torch.int32, device=device)
        self.logits = torch.zeros(self.sizes[-1], model.lm_head.out_features, dtype=torch.float32, device=device)
        self.variants = {layout.key: self._build(layout) for layout in layouts}
        pinned = device.type == "cuda"
        self.host = torch.zeros(size, dtype=torch.int32, pin_memory=pinned)
        self.host_words = self.host.numpy()  # shares memory: numpy slice writes are the fast fill
        self.host_floats = self.host_words.view(np.float32)
        self._copied = torch.cuda.Event() if pinned else None
        self.replays: Counter[tuple[int, int | None, int]] = Counter()  # steps run, by variant key

    # --- set-up ---
    def _build(self, layout: GraphLayout) -> GraphedStep:
        buffer, batch, capacity = self.buffer, layout.batch, layout.tile_capacity
        lora = None
        if layout.block_r is not None:
            plans = {m: LoraTritonPlan(int_view(buffer, layout.tile_rows[m], capacity, layout.block_m),
                                       int_view(buffer, layout.tile_sizes[m]),
                                       int_view(buffer, layout.tile_pages[m], capacity, layout.block_r),
                                       float_view(buffer, layout.tile_scales[m]),
                                       batch, layout.block_m, layout.block_r,
                                       real_tiles=capacity)  # capacity: tile_sizes says which hold tokens
                     for m in layout.modules}
            lora = PlannedLora(plans, self.pool, self.tuning, self.side_stream, self.lora_beside_gemm)
        decode = DecodeBatch(rows=None, slots=None, mask=None, seq_indices=frozenset(range(batch)),
                             block_tables=int_view(buffer, layout.block_tables, batch, layout.table_width),
                             context_lens=int_view(buffer, layout.context_lens))
        # positions and slots are int32 views here; the body widens them inside the graph. The
        # per-sequence lists are placeholders: a decode-only step's attention reads ctx.decode.
        context = StepContext(positions=int_view(buffer, layout.positions), slot_mapping=int_view(buffer, layout.slots),
                              cu_seqlens=list(range(batch + 1)), context_lens=[1] * batch, block_tables=[],
                              logits_indices=torch.empty(0), lora=lora, block_size=self.block_size, decode=decode)
        return GraphedStep(layout, context, int_view(buffer, layout.token_ids))

    def capture(self) -> None:
        """Records every variant's graph (CUDA only): largest batch first, so smaller graphs
        reuse the pool memory the largest one allocated."""
        if self.mode != CAPTURE:
            return
        pool, side = torch.cuda.graph_pool_handle(), torch.cuda.Stream(self.device)
        for key in sorted(self.variants, key=lambda k: (k[0], k[1] or 0, k[2]), reverse=True):
            step = self.variants[key]
            self.prepare(step, PackedStep())  # every row padding: the warm-up touches no real KV slot
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):  # warm-up off the capture: Triton compiles, allocators settle
                self._body(step)
            torch.cuda.current_stream(self.device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._body(step)  # writes DecodeGraphs.logits
            step.graph = graph
        torch.cuda.synchronize(self.device)

    # --- per step ---
    def choose(self, packed: PackedStep) -> GraphedStep | None:
        """The variant for this step, or None when it must run eagerly."""
        if not packed.is_decode_only or packed.num_seqs > self.sizes[-1]:
            return None
        if max(map(len, packed.block_tables)) > self.table_width:  # a context the graphs were not sized for
            return None
        batch = next(size for size in self.sizes if size >= packed.num_seqs)
        if not packed.groups:
            return self.variants[(batch, None, 0)]
        rank = packed.max_rank
        block_r = next((r for r in self.paddings if r >= rank), None)
        if block_r is None:
            return None
        # The bound never exceeds the step's rows (each tile holds one), so the batch's own
        # capacity always holds it; the fallback only hands a broken bound to tile_segments' check.
        tiles = step_tiles(packed.groups, DEFAULT_BLOCK_M)
        capacities = self.capacities[batch]
        capacity = next((c for c in capacities if c >= tiles), capacities[-1])
        return self.variants[(batch, block_r, capacity)]

    def run(self, step: GraphedStep, packed: PackedStep, input_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Float32 logits [num_seqs, vocab] of the step's sequences: a view into the shared
        logits buffer, so read it before the next step overwrites it (queue the work that reads
        it first: the next replay is queued after it). input_ids: the rows' token ids on the
        device, in place of packed.tokens (an overlapped step's, sampled by the step before)."""
        if packed.num_seqs > step.layout.batch:
            raise ValueError(f"{packed.num_seqs} sequences do not fit a graph of {step.layout.batch}")
        self.prepare(step, packed)
        if input_ids is not None:  # queued after the upload, so it overwrites packed.tokens' stand-ins
            step.token_ids[:packed.num_seqs].copy_(input_ids)
        self.replays[step.layout.key] += 1
        if step.graph is not None:
            step.graph.replay()
        else:
            self._body(step)
        return self.logits[:packed.num_seqs]

    def _body(self, step: GraphedStep) -> None:
        """The captured work: forward over the static buffers, every row's logits into self.logits."""
        static = step.context
        context = StepContext(positions=static.positions.long(), slot_mapping=static.slot_mapping.long(),
                              cu_seqlens=static.cu_seqlens, context_lens=static.context_lens, block_tables=[],
                              logits_indices=static.logits_indices, lora=static.lora, block_size=self.block_size,
                              decode=static.decode)
        hidden = self.model(step.token_ids.long(), context)
        self.logits[:step.layout.batch].copy_(self.model.compute_logits(hidden))

    def prepare(self, step: GraphedStep, packed: PackedStep) -> None:
        """The host side of a step: its inputs into the pinned twin, then one async copy."""
        self._fill(step, packed)
        self._upload(step)

    def _fill(self, step: GraphedStep, packed: PackedStep) -> None:
        """Writes the step's inputs into the host twin; padding rows as described above."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous upload has left the host buffer
        layout, words, n = step.layout, self.host_words, packed.num_seqs
        for region, values, pad in ((layout.token_ids, packed.tokens, 0), (layout.positions, packed.positions, 0),
                                    (layout.slots, packed.slots, self.scratch_slot),
                                    (layout.context_lens, packed.context_lens, 0)):
            words[region.start:region.start + n] = values
            words[region.start + n:region.stop] = pad
        width, start = layout.table_width, layout.block_tables.start
        for row, table in enumerate(packed.block_tables):  # entries past a context are never read
            words[start + row * width:start + row * width + len(table)] = table
        if layout.block_r is not None:
            self._fill_tiles(layout, packed)

    def _fill_tiles(self, layout: GraphLayout, packed: PackedStep) -> None:
        """Each projection's tiles: planned once per distinct set of targeting adapters and
        copied as arrays to every projection it serves; untargeted projections get empty tiles."""
        targets = segments_by_targets(packed.groups, layout.modules)
        planned: dict[tuple[int, ...], tuple[np.ndarray, ...]] = {}
        for module in layout.modules:
            targeting, segments = targets.get(module, ((), []))
            if targeting not in planned:
                tiles = tile_segments(segments, layout.batch, layout.block_m, block_r=layout.block_r,
                                      max_tiles=layout.tile_capacity)
                planned[targeting] = (np.asarray(tiles.rows, np.int32), np.asarray(tiles.pages, np.int32),
                                      np.asarray(tiles.sizes, np.int32), np.asarray(tiles.scales, np.float32))
            rows, pages, sizes, scales = planned[targeting]
            for region, values in ((layout.tile_rows[module], rows), (layout.tile_pages[module], pages),
                                   (layout.tile_sizes[module], sizes)):
                self.host_words[region.start:region.stop] = values
            region = layout.tile_scales[module]
            self.host_floats[region.start:region.stop] = scales

    def _upload(self, step: GraphedStep) -> None:
        size = step.layout.size
        self.buffer[:size].copy_(self.host[:size], non_blocking=self._copied is not None)
        if self._copied is not None:
            self._copied.record()
