"""Page-indexed LoRA on the GPU: segment-tiled Triton shrink and expand over the adapter pool.

Why tiles: the first, naive Triton pair (DESIGN.md §4) read an adapter's pages once per
token, so 64 decode tokens over 8 adapters cost as much as over 64. Here a per-step plan
groups the tokens of each adapter (from any number of segments, so decode rows of a shared
adapter join up too) into tiles of up to `block_m` rows; a tile reads its adapter's A and B
pages once and multiplies them with tl.dot on the tensor cores.

Why two kernels by default (shrink, then expand) rather than one fused program: a fused
program per (tile, out block) has to recompute the whole shrink — reading x[tile] and the
adapter's A pages over all of `in` — for every one of the cdiv(out, BLOCK_N) out blocks,
e.g. 32x the A traffic at 4096 -> 4096. That only pays when `in` is tiny, which no Llama
projection is; the two-kernel form reads A once per tile and pays one extra launch
(cheap under CUDA graphs) and a small fp32 scratch buffer.

The plan depends only on the step's tokens and adapters, not on in/out features, so one
plan serves every layer and projection whose targeting adapters are the same.
The reference twin is kernels/reference.py (lora_segments, lora_tokens).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from services.inference.kernels.backend import triton_available
from services.inference.kernels.reference import Segment

__all__ = ["HostTiles", "LoraSlice", "LoraTritonPlan", "SlicedLora", "build_lora_plan", "choose_split_k",
           "default_splits_per_load", "lora_shrink_expand", "lora_shrink_expand_slices", "max_tiles_for",
           "plan_from_token_pages", "tile_segments", "triton_available"]

# 16 is the smallest M tl.dot takes on the tensor cores, and decode tiles rarely hold more
# than a few rows of one adapter; prefill-heavy steps may do better with 32 or 64 (fewer
# tiles, so fewer re-reads of B from L2): a measurement, not a belief, should choose.
DEFAULT_BLOCK_M = 16
MIN_DOT_DIM = 16
# K and N steps of 128: 256-byte bf16 row pieces, whole cache lines per load. Compiled for
# sm_90 with BLOCK_M 16 and BLOCK_R 64 (triton 3.6, no GPU): shrink 72 / expand 93
# registers, no spills, the shrink's loads pipelined with cp.async in 40 KB of shared memory.
DEFAULT_BLOCK_K = 128
DEFAULT_BLOCK_N = 128
# The expand sums a tile's split-K partials [BLOCK_M, BLOCK_R] fp32 this many at a time, in one
# load: 4096 floats over a 4-warp program's 128 threads is 32 registers each. Rank-16 decode
# tiles take up to 16 splits at once, choose_split_k's cap, so the usual sum is one round trip.
SPLIT_LOAD_ELEMENTS = 4096


@dataclass(frozen=True)
class LoraTritonPlan:
    """Per-step tiles of tokens that share an adapter; device tensors, built once per step.

    Tiles past `real_tiles` (up to a fixed capacity, for CUDA graphs) have size 0: the shrink's
    programs for them return at once, the expand's run with every load and store masked off.
    """

    tile_rows: torch.Tensor  # [num_tiles, block_m] int32 token rows, -1 past the tile's size
    tile_sizes: torch.Tensor  # [num_tiles] int32 real rows per tile, 0 for padding tiles
    tile_pages: torch.Tensor  # [num_tiles, block_r] int32 the adapter's page ids, -1 past its rank
    tile_scales: torch.Tensor  # [num_tiles] float32 the adapter's scale, 0 for padding tiles
    num_tokens: int  # rows of the x and y this plan is for
    block_m: int
    block_r: int
    real_tiles: int  # tiles that hold tokens; informative (kernels read tile_sizes)

    @property
    def num_tiles(self) -> int:
        return self.tile_rows.shape[0]


def rank_paddings(max_rank: int) -> list[int]:
    """The block_r values steps with adapters of rank <= max_rank use: powers of two from 16 up."""
    paddings = [MIN_DOT_DIM]
    while paddings[-1] < max_rank:
        paddings.append(paddings[-1] * 2)
    return paddings


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _k_slices(in_features: int, split_k: int, block_k: int) -> tuple[int, int]:
    """(k_per_split, split_k): slices are whole K blocks, and none starts past `in`."""
    k_per_split = _cdiv(_cdiv(in_features, max(split_k, 1)), block_k) * block_k
    return k_per_split, max(1, _cdiv(in_features, k_per_split))


def max_tiles_for(num_tokens: int, max_adapters: int, block_m: int = DEFAULT_BLOCK_M) -> int:
    """Semantics: an upper bound on build_lora_plan's tile count for `num_tokens` tokens over at
    most `max_adapters` adapters: Σ_a ceil(n_a / block_m) <= T / block_m + A, and each tile
    holds a token. Pass it as `max_tiles` to get one plan shape per batch size (CUDA graphs).
    """
    return max(1, min(num_tokens, _cdiv(num_tokens, block_m) + max_adapters))


@dataclass(frozen=True)
class HostTiles:
    """A plan's tiles as flat host lists (row-major), before they go to a device: build_lora_plan
    makes tensors of them; the CUDA-graph step writes them into its static buffers instead."""

    rows: list[int]  # num_tiles * block_m token rows, -1 past a tile's size
    sizes: list[int]  # num_tiles
    pages: list[int]  # num_tiles * block_r page ids, -1 past the adapter's rank
    scales: list[float]  # num_tiles
    block_r: int
    real_tiles: int

    @property
    def num_tiles(self) -> int:
        return len(self.sizes)


def tile_segments(segments: Sequence[Segment], num_tokens: int, block_m: int = DEFAULT_BLOCK_M, *,
                  block_r: int | None = None, max_tiles: int | None = None) -> HostTiles:
    """Semantics: the tiles of build_lora_plan (same arguments), on the host."""
    if not _is_power_of_two(block_m) or block_m < MIN_DOT_DIM:
        raise ValueError(f"block_m must be a power of two >= {MIN_DOT_DIM}, got {block_m}")
    adapters: dict[tuple[tuple[int, ...], float], list[int]] = {}
    covered = bytearray(num_tokens)
    for segment in segments:
        if segment.end <= segment.start:
            continue
        if segment.start < 0 or segment.end > num_tokens:
            raise ValueError(f"segment [{segment.start}, {segment.end}) is outside {num_tokens} tokens")
        if any(covered[segment.start:segment.end]):
            raise ValueError(f"segment [{segment.start}, {segment.end}) overlaps another segment")
        covered[segment.start:segment.end] = b"\x01" * (segment.end - segment.start)
        pages = segment.page_ids()
        if not pages:
            raise ValueError(f"segment [{segment.start}, {segment.end}) has no pages")
        adapters.setdefault((pages, float(segment.scale)), []).extend(range(segment.start, segment.end))

    max_rank = max((len(pages) for pages, _ in adapters), default=1)
    if block_r is None:
        block_r = max(MIN_DOT_DIM, _next_power_of_two(max_rank))
    elif not _is_power_of_two(block_r) or block_r < MIN_DOT_DIM or block_r < max_rank:
        raise ValueError(f"block_r must be a power of two >= max({MIN_DOT_DIM}, rank {max_rank}), got {block_r}")

    tiles = [(rows[i:i + block_m], pages, scale)
             for (pages, scale), rows in adapters.items() for i in range(0, len(rows), block_m)]
    capacity = len(tiles) if max_tiles is None else max_tiles
    if capacity < len(tiles):
        raise ValueError(f"{len(tiles)} tiles do not fit max_tiles={max_tiles}")
    padding = capacity - len(tiles)
    rows, pages_out = [], []
    for tile_rows, tile_pages, _ in tiles:
        rows += tile_rows
        rows += [-1] * (block_m - len(tile_rows))
        pages_out += tile_pages
        pages_out += [-1] * (block_r - len(tile_pages))
    rows += [-1] * (block_m * padding)
    pages_out += [-1] * (block_r * padding)
    return HostTiles(rows, [len(r) for r, _, _ in tiles] + [0] * padding, pages_out,
                     [scale for _, _, scale in tiles] + [0.0] * padding, block_r, len(tiles))


def build_lora_plan(segments: Sequence[Segment], num_tokens: int, device: torch.device | str,
                    block_m: int = DEFAULT_BLOCK_M, *, block_r: int | None = None,
                    max_tiles: int | None = None) -> LoraTritonPlan:
    """Semantics: tiles such that lora_shrink_expand(y, x, A, B, plan) == lora_segments(y, x, A, B, segments).

    Segments with the same pages and scale are one adapter: their tokens are pooled (in
    order) and cut into tiles of up to `block_m` rows; an adapter's tiles are adjacent, so
    they run together and share its pages in L2. Empty segments add nothing. Tokens must lie
    in [0, num_tokens) and in at most one segment (y is updated without atomics).
    block_r: the rank padding, a power of two >= 16 (default: the step's largest rank,
    rounded up); fix it (e.g. to the pool's largest rank) to keep kernel shapes stable.
    max_tiles: pad the plan to this many tiles (see max_tiles_for); default: no padding.
    Runs on the host (segment.page_ids()), once per step.
    """
    tiles = tile_segments(segments, num_tokens, block_m, block_r=block_r, max_tiles=max_tiles)
    capacity = tiles.num_tiles

    # Plain lists, one tensor each: a per-tile tensor op would cost more than the kernels.
    def on_device(values: list, dtype: torch.dtype, *shape: int) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).reshape(capacity, *shape).to(device)

    return LoraTritonPlan(on_device(tiles.rows, torch.int32, block_m), on_device(tiles.sizes, torch.int32),
                          on_device(tiles.pages, torch.int32, tiles.block_r), on_device(tiles.scales, torch.float32),
                          num_tokens, block_m, tiles.block_r, tiles.real_tiles)


def plan_from_token_pages(token_pages: torch.Tensor, token_scales: torch.Tensor,
                          block_m: int = DEFAULT_BLOCK_M, *, block_r: int | None = None,
                          max_tiles: int | None = None) -> LoraTritonPlan:
    """Semantics: tiles such that lora_shrink_expand(y, x, A, B, plan)
    == lora_tokens(y, x, A, B, token_pages, token_scales).

    token_pages: [T, R] int64, -1 for "no page" (a row of only -1 is base-only);
    token_scales: [T]. Rows with equal valid pages and scale are pooled into shared tiles.
    The plan lives on token_pages' device.
    """
    segments = []
    for row, (pages, scale) in enumerate(zip(token_pages.tolist(), token_scales.tolist())):
        valid = [p for p in pages if p >= 0]
        if valid:
            segments.append(Segment(row, row + 1, torch.tensor(valid, dtype=torch.int64), scale))
    return build_lora_plan(segments, token_pages.shape[0], token_pages.device, block_m,
                           block_r=block_r, max_tiles=max_tiles)


@functools.lru_cache(maxsize=None)
def _multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # an H200's count: keeps interpreter runs on the same split choices


def choose_split_k(num_tiles: int, in_features: int, block_k: int, device: torch.device) -> int:
    """Semantics: how many K slices the shrink splits `in` into (>= 1, each a multiple of block_k).

    A decode step has few tiles (64 tokens over 64 adapters: 64 tiles on 132 SMs), and one
    program per tile streaming 4096 x r pages cannot keep HBM busy; split K until there are
    ~4 programs per SM, but keep each slice >= 2 K blocks so its loads still pipeline.
    """
    target_programs = 4 * _multiprocessor_count(device)
    max_split = max(1, in_features // (2 * block_k))
    split = max(1, min(max_split, _cdiv(target_programs, max(num_tiles, 1)), 16))
    return _k_slices(in_features, split, block_k)[1]


def default_splits_per_load(block_m: int, block_r: int) -> int:
    """How many split-K partials the expand loads at once (a power of two, from shapes only so
    that steps of any split share one compiled kernel)."""
    return max(1, SPLIT_LOAD_ELEMENTS // (block_m * block_r))


def lora_shrink_expand(y: torch.Tensor, x: torch.Tensor, a_pages: torch.Tensor, b_pages: torch.Tensor,
                       plan: LoraTritonPlan, *, block_k: int = DEFAULT_BLOCK_K, block_n: int = DEFAULT_BLOCK_N,
                       split_k: int | None = None, splits_per_load: int | None = None) -> torch.Tensor:
    """Semantics: y[t] += scale_a * (x[t] @ a_pages[p_a].T) @ b_pages[p_a]   for every token t of
    adapter a in the plan; other rows of y are untouched (bitwise).

    y: [T, out] float32/bfloat16/float16, updated in place in its own dtype and returned;
    x: [T, in], a_pages: [P, in], b_pages: [P, out], all one dtype (y may differ); the last
    dims need not be contiguous. The shrink accumulates in fp32 into an fp32 scratch; for
    16-bit inputs the shrunk values are rounded to that dtype for the expand's tensor-core
    dot (fp32 accumulate). No host sync: launch choices come from shapes only, so a fixed
    plan shape can be captured in a CUDA graph. block_k (shrink K step), block_n (expand
    out-block width) and split_k (K slices of the shrink; default choose_split_k) are
    tuning knobs: powers of two >= 16, any split_k >= 1; splits_per_load too (any power of
    two: see lora_shrink_expand_slices).
    """
    if b_pages.shape[1] != y.shape[1]:
        raise ValueError(f"y {tuple(y.shape)} and b_pages {tuple(b_pages.shape)} disagree on out features")
    return lora_shrink_expand_slices(y, x, [LoraSlice(a_pages, b_pages, plan, 0)], block_k=block_k,
                                     block_n=block_n, split_k=split_k, splits_per_load=splits_per_load)


@dataclass(frozen=True)
class LoraSlice:
    """One projection of a fused launch: its pool pages, its plan, and where its columns start in y."""

    a_pages: torch.Tensor  # [P, in]
    b_pages: torch.Tensor  # [P, out]
    plan: LoraTritonPlan
    column: int


def lora_shrink_expand_slices(y: torch.Tensor, x: torch.Tensor, slices: Sequence[LoraSlice], *,
                              block_k: int = DEFAULT_BLOCK_K, block_n: int = DEFAULT_BLOCK_N,
                              split_k: int | None = None, splits_per_load: int | None = None) -> torch.Tensor:
    """Semantics: for each slice s, lora_shrink_expand(y[:, s.column:s.column + out_s], x, s.a_pages,
    s.b_pages, s.plan) — up to MAX_SLICES projections that read the same x (q|k|v, gate|up, whose
    outputs are column ranges of one GEMM's y) in one shrink and one expand launch.

    Slices come in column order and must not overlap; their plans must share num_tokens, capacity, block_m
    and block_r (one plan object for all, or a CUDA graph's per-projection plans); their A pages
    share strides, as the pool's per-projection buffers of one input width do.
    splits_per_load (a power of two): the split-K partials the expand sums per load round
    (default: default_splits_per_load(block_m, block_r); 1 sums them one load at a time).
    """
    launch = SlicedLora(x, slices, block_k=block_k, block_n=block_n, split_k=split_k,
                        splits_per_load=splits_per_load)
    launch.shrink()  # writes only its own partials: a y the expand refuses is left untouched
    return launch.expand(y)


class SlicedLora:
    """lora_shrink_expand_slices in its two launches, so that a caller can run the shrink beside
    the base GEMM (both only read x; kernels/streams.py) and the expand once both are done.

    Built on the current stream: the shrink's fp32 partials are allocated here, so a shrink run
    on another stream writes memory the current stream owns and frees after the expand.
    """

    def __init__(self, x: torch.Tensor, slices: Sequence[LoraSlice], *, block_k: int = DEFAULT_BLOCK_K,
                 block_n: int = DEFAULT_BLOCK_N, split_k: int | None = None,
                 splits_per_load: int | None = None) -> None:
        from services.inference.kernels import triton_lora_kernels as kernels

        self.kernels, self.x, self.slices = kernels, x, list(slices)
        _check_slices(x, self.slices, kernels.MAX_SLICES)
        for name, value in (("block_k", block_k), ("block_n", block_n)):
            if not _is_power_of_two(value) or value < MIN_DOT_DIM:
                raise ValueError(f"{name} must be a power of two >= {MIN_DOT_DIM}, got {value}")
        plan = self.slices[0].plan
        if splits_per_load is None:
            splits_per_load = default_splits_per_load(plan.block_m, plan.block_r)
        if not _is_power_of_two(splits_per_load):
            raise ValueError(f"splits_per_load must be a power of two, got {splits_per_load}")
        self.block_k, self.block_n, self.splits_per_load = block_k, block_n, splits_per_load
        self.outs = [piece.b_pages.shape[1] for piece in self.slices]
        # Nothing to compute: both launches return at once.
        self.empty = plan.num_tiles == 0 or x.shape[0] == 0 or sum(self.outs) == 0
        if split_k is None:
            split_k = choose_split_k(plan.num_tiles * len(self.slices), x.shape[1], block_k, x.device)
        self.k_per_split, self.split_k = _k_slices(x.shape[1], split_k, block_k)
        self.partial = None if self.empty else torch.empty(
            (len(self.slices), self.split_k, plan.num_tiles, plan.block_m, plan.block_r),
            dtype=torch.float32, device=x.device)
        # Exact fp32 products when the inputs are fp32 (tests, CPU); 16-bit inputs ignore it.
        self.precision = "ieee" if x.dtype == torch.float32 else "tf32"
        # Unused pads: no programs read them.
        self.padded = self.slices + [self.slices[0]] * (kernels.MAX_SLICES - len(self.slices))

    def _each(self, field: str) -> list:
        return [getattr(piece.plan, field) for piece in self.padded]

    def check_output(self, y: torch.Tensor) -> None:
        if y.shape[0] != self.x.shape[0]:
            raise ValueError(f"plan for {self.slices[0].plan.num_tokens} tokens, x {tuple(self.x.shape)}, "
                             f"y {tuple(y.shape)}")
        for piece in self.slices:
            if piece.column < 0 or piece.column + piece.b_pages.shape[1] > y.shape[1]:
                raise ValueError(f"slice at column {piece.column} of {piece.b_pages.shape[1]} "
                                 f"is outside y {tuple(y.shape)}")

    def shrink(self) -> None:
        """partial[s, split, tile] = x[tile rows, split's K range] @ A pages of slice s (fp32)."""
        if self.empty:
            return
        x, first, plan = self.x, self.slices[0], self.slices[0].plan
        self.kernels.lora_shrink_kernel[(plan.num_tiles, self.split_k, len(self.slices))](
            x, self.partial, *(piece.a_pages for piece in self.padded), *self._each("tile_rows"),
            *self._each("tile_sizes"), *self._each("tile_pages"),
            plan.num_tiles, x.shape[1], self.k_per_split,
            x.stride(0), x.stride(1), first.a_pages.stride(0), first.a_pages.stride(1),
            BLOCK_M=plan.block_m, BLOCK_R=plan.block_r, BLOCK_K=self.block_k, DOT_PRECISION=self.precision,
            num_warps=4, num_stages=3,
        )

    def expand(self, y: torch.Tensor) -> torch.Tensor:
        """y[tile rows, slice s's columns] += scale * sum over splits of partial[s] @ B pages of s."""
        if self.empty:
            return y
        self.check_output(y)
        first, plan, block_n = self.slices[0], self.slices[0].plan, self.block_n
        outs = self.outs + [0] * (self.kernels.MAX_SLICES - len(self.slices))
        # The kernel puts slice 0 at column 0: y from the first slice's column on, the others after it.
        columns = [piece.column - first.column for piece in self.padded]
        self.kernels.lora_expand_kernel[(plan.num_tiles, sum(_cdiv(out, block_n) for out in outs))](
            y[:, first.column:], self.partial, *(piece.b_pages for piece in self.padded), *self._each("tile_rows"),
            *self._each("tile_sizes"), *self._each("tile_pages"), *self._each("tile_scales"),
            plan.num_tiles, self.split_k, *outs, columns[1], columns[2],
            y.stride(0), y.stride(1), *(piece.b_pages.stride(0) for piece in self.padded), first.b_pages.stride(1),
            BLOCK_M=plan.block_m, BLOCK_R=plan.block_r, BLOCK_N=block_n, SPLITS_PER_LOAD=self.splits_per_load,
            DOT_PRECISION=self.precision, num_warps=4,
        )
        return y


def _check_slices(x: torch.Tensor, slices: list[LoraSlice], max_slices: int) -> None:
    if not 1 <= len(slices) <= max_slices:
        raise ValueError(f"1 to {max_slices} slices per launch, got {len(slices)}")
    first = slices[0]
    plan, num_tokens, in_features = first.plan, x.shape[0], x.shape[1]
    if num_tokens != plan.num_tokens:
        raise ValueError(f"plan for {plan.num_tokens} tokens, x {tuple(x.shape)}")
    if any(later.column < earlier.column + earlier.b_pages.shape[1] for earlier, later in zip(slices, slices[1:])):
        raise ValueError("slices must come in column order without overlapping")
    for piece in slices:
        other = piece.plan
        if (other.num_tokens, other.num_tiles, other.block_m, other.block_r) != \
                (plan.num_tokens, plan.num_tiles, plan.block_m, plan.block_r):
            raise ValueError("slices' plans differ in tokens, capacity, block_m or block_r")
        if piece.a_pages.shape[1] != in_features or not (x.dtype == piece.a_pages.dtype == piece.b_pages.dtype):
            raise ValueError(f"x {tuple(x.shape)} {x.dtype}, a_pages {tuple(piece.a_pages.shape)} "
                             f"{piece.a_pages.dtype}, b_pages {piece.b_pages.dtype} do not agree")
        if piece.a_pages.stride() != first.a_pages.stride() or piece.b_pages.stride(1) != first.b_pages.stride(1):
            raise ValueError("slices' pages must share strides (A) and the out stride (B)")
        if other.tile_rows.device != x.device:
            raise ValueError(f"plan on {other.tile_rows.device}, x on {x.device}")
