"""The shapes bench/kernels.py measures, and the paths it compares on each.

LoRA: one projection of a Llama-3-8B layer (4096 -> 4096 q/o, 4096 -> 1024 k/v, 4096 -> 14336
gate/up, 14336 -> 4096 down), rank 16, decode (64 tokens over 1, 16 or 64 adapters) and
prefill (4096 tokens over 8 adapters). Decode rows are taken as grouped by adapter (the plan
sorts them so), so each adapter is one segment. Attention: paged decode, 32 query heads over 8
KV heads of 128, 512-token contexts in 16-token blocks scattered over the cache; and prefill
chunks after cached context (a prefix-cache hit, a later chunk of a chunked prefill): 16
sequences of 256 new tokens after 512 cached, the model's per-sequence loop against the
Triton paged prefill kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch

from services.inference.kernels.reference import Segment, lora_gathered, lora_segments
from services.inference.model.attention import build_continued_prefills, build_decode_batch, paged_attention
from services.inference.model.context import StepContext


@dataclasses.dataclass
class Variant:
    check: Callable[[], torch.Tensor]  # a fresh result to compare with the reference
    run: Callable[[], object]  # the timed call, on static buffers (CUDA-graph capturable if it can be)


@dataclasses.dataclass
class LoraCase:
    name: str
    in_features: int
    out_features: int
    tokens: int
    adapters: int
    rank: int
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.tokens * 131 + self.adapters)
        pages = self.adapters * self.rank + 8  # a few pages no adapter uses
        dense = lambda *shape, scale: (torch.randn(*shape, generator=generator) * scale).to(self.device, self.dtype)  # noqa: E731
        self.a_pages = dense(pages, self.in_features, scale=self.in_features ** -0.5)
        self.b_pages = dense(pages, self.out_features, scale=0.05)
        self.x = dense(self.tokens, self.in_features, scale=1.0)
        self.y0 = dense(self.tokens, self.out_features, scale=1.0)
        self.weight = dense(self.out_features, self.in_features, scale=self.in_features ** -0.5)
        order = torch.randperm(pages - 8, generator=generator)  # adapters own scattered pages
        per_adapter = -(-self.tokens // self.adapters)
        self.segments = [Segment(i * per_adapter, min((i + 1) * per_adapter, self.tokens),
                                 order[i * self.rank:(i + 1) * self.rank].to(self.device), 0.5 + i / self.adapters)
                         for i in range(self.adapters) if i * per_adapter < self.tokens]
        self.y = self.y0.clone()

    def describe(self) -> dict:
        return {"in": self.in_features, "out": self.out_features, "tokens": self.tokens, "adapters": self.adapters,
                "rank": self.rank}

    @property
    def bytes_moved(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        activations = self.tokens * (self.in_features + 2 * self.out_features)  # x read, y read + written
        pages = len(self.segments) * self.rank * (self.in_features + self.out_features)
        return (activations + pages) * element

    def expected(self) -> torch.Tensor:
        return lora_segments(self.y0.float().clone(), self.x.float(), self.a_pages.float(), self.b_pages.float(),
                             self.segments)

    def _fresh(self, fn: Callable[[torch.Tensor], object]) -> Callable[[], torch.Tensor]:
        def check() -> torch.Tensor:
            y = self.y0.clone()
            fn(y)
            return y
        return check

    def variants(self) -> dict[str, Callable[[], Variant]]:
        """Factories: building one may fail (e.g. no Triton) without costing the others."""
        variants = {"reference_segments": lambda: self._variant(
            lambda y: lora_segments(y, self.x, self.a_pages, self.b_pages, self.segments))}
        if self.tokens <= 256:  # the CPU decode path: one gather, two bmm
            variants["reference_gathered"] = self._gathered_variant
        variants["grouped_mm"] = lambda: self._variant(self._grouped)
        variants["triton"] = self._triton_variant
        if self.tokens <= 256:  # v5's split loads at decode (see FusedLoraCase)
            variants["triton_serial_splits"] = lambda: self._triton_variant(splits_per_load=1)
            variants["triton_n256"] = lambda: self._triton_variant(block_n=256)
        if self.tokens > 256:  # the wider tiles --prefill-lora may choose for long segments
            for block_m in (32, 64):
                variants[f"triton_tiles{block_m}"] = lambda block_m=block_m: self._triton_variant(block_m)
        return variants

    def _gathered_variant(self) -> Variant:
        rows = torch.arange(self.tokens, device=self.device)
        owner = [next(s for s in self.segments if s.start <= t < s.end) for t in range(self.tokens)]
        pages = torch.stack([s.pages for s in owner])
        scales = torch.tensor([[s.scale] * self.rank for s in owner], device=self.device)
        return self._variant(lambda y: lora_gathered(y, self.x, self.a_pages, self.b_pages, rows, pages, scales))

    def _variant(self, fn: Callable[[torch.Tensor], object]) -> Variant:
        return Variant(self._fresh(fn), lambda: fn(self.y))

    def _grouped(self, y: torch.Tensor) -> None:
        from services.inference.kernels.grouped import lora_grouped

        lora_grouped(y, self.x, self.a_pages, self.b_pages, self.segments)

    def _triton_variant(self, block_m: int = 16, **knobs: int) -> Variant:
        from services.inference.kernels.triton_lora import build_lora_plan, lora_shrink_expand

        plan = build_lora_plan(self.segments, self.tokens, self.device, block_m)  # once per step, for all layers
        return self._variant(lambda y: lora_shrink_expand(y, self.x, self.a_pages, self.b_pages, plan, **knobs))

    def base_gemm(self) -> Callable[[], object]:
        out = torch.empty_like(self.y)
        return lambda: torch.matmul(self.x, self.weight.T, out=out)


@dataclasses.dataclass
class FusedLoraCase(LoraCase):
    """Projections that read one x (q|k|v: 4096 -> 4096 + 1024 + 1024) whose outputs are column
    ranges of one fused GEMM's y, each with its own A pages: a launch pair per projection
    against one pair for all (lora_shrink_expand_slices). out_features is their sum."""

    splits: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()  # b_pages [P, sum(splits)]: each projection's B is a column range
        generator = torch.Generator().manual_seed(7)
        self.a_each = [(torch.randn(self.a_pages.shape, generator=generator) * self.in_features ** -0.5)
                       .to(self.device, self.dtype) for _ in self.splits]
        self.columns = [sum(self.splits[:i]) for i in range(len(self.splits))]
        self.b_each = [self.b_pages[:, c:c + n] for c, n in zip(self.columns, self.splits)]

    @property
    def bytes_moved(self) -> int:
        extra_a = (len(self.splits) - 1) * len(self.segments) * self.rank * self.in_features
        return super().bytes_moved + extra_a * (torch.finfo(self.dtype).bits // 8)

    def _each(self, y: torch.Tensor, fn) -> None:
        for a, b, c, n in zip(self.a_each, self.b_each, self.columns, self.splits):
            fn(y[:, c:c + n], a, b)

    def expected(self) -> torch.Tensor:
        y = self.y0.float().clone()
        self._each(y, lambda part, a, b: part.copy_(lora_segments(part.clone(), self.x.float(), a.float(), b.float(),
                                                                  self.segments)))
        return y

    def variants(self) -> dict[str, Callable[[], Variant]]:
        from services.inference.kernels.triton_lora import (LoraSlice, build_lora_plan, lora_shrink_expand,
                                                            lora_shrink_expand_slices)

        plan = build_lora_plan(self.segments, self.tokens, self.device)
        slices = [LoraSlice(a, b, plan, c) for a, b, c in zip(self.a_each, self.b_each, self.columns)]
        # As a CUDA graph plans it: capacity for one tile per token (most tiles empty when few
        # adapters share the batch), rank padded to 16; then the knobs the graphs could fix.
        graphed = build_lora_plan(self.segments, self.tokens, self.device, block_r=16, max_tiles=self.tokens)
        graph_slices = [LoraSlice(a, b, graphed, c) for a, b, c in zip(self.a_each, self.b_each, self.columns)]

        def sliced(pieces, **knobs):
            return lambda: self._variant(lambda y: lora_shrink_expand_slices(y, self.x, pieces, **knobs))

        variants = {"reference_segments": lambda: self._variant(lambda y: self._each(
                        y, lambda part, a, b: lora_segments(part, self.x, a, b, self.segments))),
                    "triton_per_projection": lambda: self._variant(lambda y: self._each(
                        y, lambda part, a, b: lora_shrink_expand(part, self.x, a, b, plan))),
                    "triton_slices": sliced(slices), "triton_slices_graph_plan": sliced(graph_slices)}
        # v7 (bench/gpu_notes.md): the layer's GEMM and the graph plan's LoRA, in each mode of
        # --decode-lora-beside-gemm (after the GEMM, its shrink or all of it on a second stream);
        # base_gemm_us is the GEMM alone.
        from services.inference.kernels.decode_lora_tuning import BESIDE_LABELS

        for mode, label in BESIDE_LABELS.items():
            variants[f"{label}_graph_plan"] = lambda mode=mode: self._with_gemm(graph_slices, mode)
        if self.tokens >= 64:  # the tuning sweep of the next GPU run (bench/gpu_notes.md, v3)
            for split_k in (4, 8, 16):
                variants[f"triton_slices_graph_plan_split{split_k}"] = sliced(graph_slices, split_k=split_k)
            for block_n in (64, 256, 512):
                variants[f"triton_slices_graph_plan_n{block_n}"] = sliced(graph_slices, block_n=block_n)
            # v5 (bench/gpu_notes.md): the split sums one load at a time, as v3's loop did
            variants["triton_slices_graph_plan_serial_splits"] = sliced(graph_slices, splits_per_load=1)
        return variants


    def _with_gemm(self, slices, mode: str) -> Variant:
        """The whole projection, GEMM and LoRA; checked as y0 + (it - the GEMM alone), the LoRA term."""
        from services.inference.kernels.streams import linear_with_lora, side_stream_for
        from services.inference.kernels.triton_lora import SlicedLora

        side = side_stream_for(self.device, mode != "off")

        def project() -> torch.Tensor:
            return linear_with_lora(self.x, self.weight, None, SlicedLora(self.x, slices), mode, side)

        def check() -> torch.Tensor:
            return project().float() - torch.nn.functional.linear(self.x, self.weight).float() + self.y0.float()
        return Variant(check, project)


def lora_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[LoraCase]:
    if smoke:
        return [LoraCase("decode smoke", 64, 96, 8, 4, 4, device, dtype),
                LoraCase("prefill smoke", 64, 96, 300, 2, 4, device, dtype),
                FusedLoraCase("decode qkv smoke", 64, 96, 8, 4, 4, device, dtype, splits=(64, 16, 16))]
    shapes = {"qo": (4096, 4096), "kv": (4096, 1024), "gate_up": (4096, 14336), "down": (14336, 4096)}
    cases = []
    for label, (fan_in, fan_out) in shapes.items():
        for adapters in (1, 16, 64):
            cases.append(LoraCase(f"decode {label} 64 tokens {adapters} adapters", fan_in, fan_out, 64, adapters,
                                  16, device, dtype))
        cases.append(LoraCase(f"prefill {label} 4096 tokens 8 adapters", fan_in, fan_out, 4096, 8, 16, device, dtype))
    for adapters in (1, 16, 64):  # the fused GEMMs' LoRA: one launch pair for q|k|v, and for gate|up
        cases.append(FusedLoraCase(f"decode qkv 64 tokens {adapters} adapters", 4096, 6144, 64, adapters, 16, device,
                                   dtype, splits=(4096, 1024, 1024)))
        cases.append(FusedLoraCase(f"decode gate|up 64 tokens {adapters} adapters", 4096, 28672, 64, adapters, 16,
                                   device, dtype, splits=(14336, 14336)))
    return cases


@dataclasses.dataclass
class AttentionCase:
    name: str
    batch: int
    context: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    device: torch.device
    dtype: torch.dtype
    # The block table's width in tokens (default: the context): a CUDA graph's tables are
    # sized for the node's longest context, and the kernel's split is chosen from that width.
    table_tokens: int = 0

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.batch * 7 + self.context)
        per_seq = -(-self.context // self.block_size)
        num_blocks = self.batch * per_seq + 4
        shape = (num_blocks, self.block_size, self.kv_heads, self.head_dim)
        self.k_cache = torch.randn(*shape, generator=generator).to(self.device, self.dtype)
        self.v_cache = torch.randn(*shape, generator=generator).to(self.device, self.dtype)
        self.q = torch.randn(self.batch, self.heads, self.head_dim, generator=generator).to(self.device, self.dtype)
        # Lengths vary around `context`; blocks are a random permutation (a long-running cache).
        self.lengths = [max(1, self.context - (i * 37) % max(1, self.context // 4)) for i in range(self.batch)]
        blocks = torch.randperm(num_blocks, generator=generator)[: self.batch * per_seq].view(self.batch, per_seq)
        width = max(per_seq, -(-self.table_tokens // self.block_size))
        blocks = torch.cat([blocks, torch.zeros(self.batch, width - per_seq, dtype=blocks.dtype)], dim=1)
        self.block_tables = blocks.to(self.device, torch.int32)  # entries past a context are never read
        self.context_lens = torch.tensor(self.lengths, dtype=torch.int32, device=self.device)
        self.scale = self.head_dim ** -0.5
        self.out = torch.empty_like(self.q)

    def describe(self) -> dict:
        return {"batch": self.batch, "context": self.context, "heads": self.heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "block_size": self.block_size,
                "table_tokens": self.block_tables.shape[1] * self.block_size}

    @property
    def bytes_moved(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        return (2 * sum(self.lengths) * self.kv_heads * self.head_dim + 2 * self.q.numel()) * element

    def expected(self) -> torch.Tensor:
        out = torch.empty(self.q.shape, dtype=torch.float32, device=self.device)
        group = self.heads // self.kv_heads
        for s, length in enumerate(self.lengths):
            blocks = self.block_tables[s].long()
            keys = self.k_cache[blocks].flatten(0, 1)[:length].float().repeat_interleave(group, dim=1)  # [C, H, D]
            values = self.v_cache[blocks].flatten(0, 1)[:length].float().repeat_interleave(group, dim=1)
            weights = torch.softmax(torch.einsum("hd,chd->hc", self.q[s].float(), keys) * self.scale, dim=-1)
            out[s] = torch.einsum("hc,chd->hd", weights, values)
        return out

    def variants(self) -> dict[str, Callable[[], Variant]]:
        variants = {"torch_padded_gather": self._torch_variant, "triton": self._triton_variant}
        if self.batch * self.kv_heads < 256:  # split-K territory: the partition counts the choice weighs
            for count in (1, 2, 4, 8, 16, 32):
                variants[f"triton_partitions{count}"] = functools.partial(self._triton_variant, count)
        else:  # v5's sweep (bench/gpu_notes.md): at batch 64 one program walks a whole context, 8 tiles in turn
            for count in (2, 4):
                variants[f"triton_partitions{count}"] = functools.partial(self._triton_variant, count)
            for tile, stages in ((64, 3), (32, 2), (32, 3), (16, 4)):
                variants[f"triton_tile{tile}_stages{stages}"] = functools.partial(
                    self._triton_variant, tile_tokens=tile, num_stages=stages)
        return variants

    def _torch_variant(self) -> Variant:
        """The model's own PyTorch decode path (model/attention.py: padded gather, one SDPA)."""
        ctx = StepContext(positions=torch.tensor([n - 1 for n in self.lengths], device=self.device),
                          slot_mapping=torch.zeros(self.batch, dtype=torch.int64, device=self.device),
                          cu_seqlens=list(range(self.batch + 1)), context_lens=list(self.lengths),
                          block_tables=[self.block_tables[s, :-(-n // self.block_size)].long()
                                        for s, n in enumerate(self.lengths)],
                          logits_indices=torch.arange(self.batch, device=self.device), block_size=self.block_size)
        ctx.decode = build_decode_batch(ctx)
        return Variant(lambda: paged_attention(self.q, self.k_cache, self.v_cache, ctx, self.scale),
                       lambda: paged_attention(self.q, self.k_cache, self.v_cache, ctx, self.scale))

    def _triton_variant(self, num_partitions: int | None = None, **knobs: int) -> Variant:
        from services.inference.kernels.triton_attention import paged_decode_attention

        def attend() -> torch.Tensor:
            return paged_decode_attention(self.q, self.k_cache, self.v_cache, self.block_tables, self.context_lens,
                                          self.scale, out=self.out, num_partitions=num_partitions, **knobs)

        return Variant(lambda: attend().clone(), attend)


def attention_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[AttentionCase]:
    if smoke:
        return [AttentionCase("decode smoke", 3, 40, 4, 2, 16, 16, device, dtype)]
    return [AttentionCase(f"decode batch {batch} context 512", batch, 512, 32, 8, 128, 16, device, dtype)
            for batch in (1, 16, 64)] + \
        [AttentionCase(f"decode batch {batch} context 512, 8192-token table", batch, 512, 32, 8, 128, 16, device,
                       dtype, table_tokens=8192) for batch in (1, 16)]


@dataclasses.dataclass
class ContinuedPrefillCase:
    """`seqs` chunks of `new` tokens, each after `cached` tokens already in the paged cache, all
    attending causally over their whole context (the chunks' own K/V are in the cache too)."""

    name: str
    seqs: int
    cached: int
    new: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    device: torch.device
    dtype: torch.dtype

    def __post_init__(self) -> None:
        generator = torch.Generator().manual_seed(self.seqs * 11 + self.cached + self.new)
        self.context = self.cached + self.new
        per_seq = -(-self.context // self.block_size)
        num_blocks = self.seqs * per_seq + 4
        shape = (num_blocks, self.block_size, self.kv_heads, self.head_dim)
        self.k_cache = torch.randn(*shape, generator=generator).to(self.device, self.dtype)
        self.v_cache = torch.randn(*shape, generator=generator).to(self.device, self.dtype)
        tokens = self.seqs * self.new
        self.q = torch.randn(tokens, self.heads, self.head_dim, generator=generator).to(self.device, self.dtype)
        blocks = torch.randperm(num_blocks, generator=generator)[: self.seqs * per_seq].view(self.seqs, per_seq)
        self.block_tables = blocks.to(self.device, torch.int64)  # as the runner pads them
        self.scale = self.head_dim ** -0.5
        self.out = torch.empty_like(self.q)

    def describe(self) -> dict:
        return {"seqs": self.seqs, "cached": self.cached, "new": self.new, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "block_size": self.block_size}

    @property
    def bytes_moved(self) -> int:
        element = torch.finfo(self.dtype).bits // 8
        return (2 * self.seqs * self.context * self.kv_heads * self.head_dim + 2 * self.q.numel()) * element

    @property
    def flops(self) -> int:
        """Two matmuls over the keys each query sees (causal: cached + its own index + 1)."""
        keys_seen = self.new * self.cached + self.new * (self.new + 1) // 2
        return 4 * self.seqs * keys_seen * self.heads * self.head_dim

    def expected(self) -> torch.Tensor:
        out = torch.empty(self.q.shape, dtype=torch.float32, device=self.device)
        group = self.heads // self.kv_heads
        query_pos = torch.arange(self.cached, self.context, device=self.device)
        visible = torch.arange(self.context, device=self.device)[None, :] <= query_pos[:, None]  # [new, C]
        for s in range(self.seqs):
            blocks = self.block_tables[s]
            keys = self.k_cache[blocks].flatten(0, 1)[:self.context].float().repeat_interleave(group, dim=1)
            values = self.v_cache[blocks].flatten(0, 1)[:self.context].float().repeat_interleave(group, dim=1)
            rows = slice(s * self.new, (s + 1) * self.new)
            logits = torch.einsum("qhd,chd->hqc", self.q[rows].float(), keys) * self.scale
            weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
            out[rows] = torch.einsum("hqc,chd->qhd", weights, values)
        return out

    def variants(self) -> dict[str, Callable[[], Variant]]:
        return {"torch_per_sequence": self._torch_variant, "triton": self._triton_variant}

    def _context(self) -> StepContext:
        tokens = self.seqs * self.new
        return StepContext(positions=torch.zeros(tokens, dtype=torch.int64, device=self.device),
                           slot_mapping=torch.zeros(tokens, dtype=torch.int64, device=self.device),
                           cu_seqlens=[s * self.new for s in range(self.seqs + 1)],
                           context_lens=[self.context] * self.seqs, block_tables=list(self.block_tables),
                           logits_indices=torch.arange(self.seqs, device=self.device), block_size=self.block_size)

    def _torch_variant(self) -> Variant:
        """The model's PyTorch path for these chunks: a block-table gather and an SDPA per sequence."""
        ctx = self._context()
        return Variant(lambda: paged_attention(self.q, self.k_cache, self.v_cache, ctx, self.scale),
                       lambda: paged_attention(self.q, self.k_cache, self.v_cache, ctx, self.scale))

    def _triton_variant(self) -> Variant:
        """One launch; the tile map is built once per step (shared by every layer), outside the timing."""
        from services.inference.kernels.triton_prefill_attention import paged_prefill_attention, prefill_tile_tokens

        continued = build_continued_prefills(self._context(), self.block_tables)
        tiles = continued.tiles(prefill_tile_tokens(self.heads, self.kv_heads, self.head_dim))

        def attend() -> torch.Tensor:
            return paged_prefill_attention(self.q, self.k_cache, self.v_cache, self.block_tables, tiles, self.scale,
                                           self.out)

        return Variant(lambda: attend().clone(), attend)


def continued_prefill_cases(device: torch.device, dtype: torch.dtype, smoke: bool) -> list[ContinuedPrefillCase]:
    if smoke:
        return [ContinuedPrefillCase("continued prefill smoke", 3, 20, 9, 4, 2, 16, 16, device, dtype)]
    return [ContinuedPrefillCase("continued prefill 16 x 256 new after 512 cached", 16, 512, 256, 32, 8, 128, 16,
                                 device, dtype)]
