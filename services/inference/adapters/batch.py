"""LoraBatch: which adapter each token of a step uses, computed once per step.

The model runner orders scheduled sequences so that tokens sharing an adapter are
contiguous; each run of tokens is one Segment. Layers call `linear`, the one seam between
the base layers and LoRA compute (their GEMM, then `apply` for each projection); with
`kernels="triton"` it plans Triton tiles instead, and segments of a prefill go through the
kernel the node measured fastest for each projection's shape at start-up
(kernels/prefill_lora.py).
On CPU, one-token segments (decodes) go through a single gathered batched matmul and
longer segments (prefill chunks) through two grouped GEMMs: measured on 2 cores, 16 decode
rows of rank 16 at 512->1408 take 150 µs gathered vs 540 µs one by one, and 16 prefill
segments of 64 tokens 7.6 ms grouped vs 143 ms one by one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from services.inference.kernels.grouped import lora_grouped
from services.inference.kernels.prefill_lora import DECODE_TILES, LONG_SEGMENT, PrefillPath, plan_path, run_planned
from services.inference.kernels.reference import Segment, lora_gathered
from services.inference.kernels.triton_lora import LoraSlice, LoraTritonPlan, build_lora_plan, lora_shrink_expand_slices


@dataclass
class AdapterSegments:
    """Segments of one adapter and the modules it targets (others contribute nothing)."""

    segments: list[Segment]
    modules: frozenset[str]


@dataclass
class GatheredRows:
    rows: torch.Tensor  # [n] int64 token rows
    pages: torch.Tensor  # [n, R] int64, padded with the row's first page
    scales: torch.Tensor  # [n, R] float32, 0 on padding


def gather_single_token_segments(segments: list[Segment]) -> GatheredRows | None:
    singles = [s for s in segments if s.end - s.start == 1]
    if not singles:
        return None
    rank = max(len(s.pages) for s in singles)
    pages = torch.stack([torch.cat([s.pages, s.pages[:1].expand(rank - len(s.pages))]) for s in singles])
    scales = torch.tensor([[s.scale] * len(s.pages) + [0.0] * (rank - len(s.pages)) for s in singles])
    rows = torch.tensor([s.start for s in singles], dtype=torch.int64)
    device = singles[0].pages.device
    return GatheredRows(rows.to(device), pages, scales.to(device))


def segments_by_targets(groups: list[AdapterSegments], modules) -> dict[str, tuple[tuple[int, ...], list[Segment]]]:
    """For each module some adapter of the step targets: which groups target it (a key shared by
    every module with the same targeting adapters, usually all seven) and their segments, so
    callers plan once per distinct key rather than once per module."""
    groups_by_modules: dict[frozenset[str], list[int]] = {}
    for i, group in enumerate(groups):
        groups_by_modules.setdefault(group.modules, []).append(i)
    by_sets: dict[tuple[frozenset[str], ...], tuple[tuple[int, ...], list[Segment]]] = {}
    result = {}
    for module in modules:
        targeted_by = tuple(targeted for targeted in groups_by_modules if module in targeted)
        if not targeted_by:
            continue
        if targeted_by not in by_sets:  # computed once per distinct set, not per module
            targeting = tuple(sorted(i for targeted in targeted_by for i in groups_by_modules[targeted]))
            by_sets[targeted_by] = (targeting, [s for i in targeting for s in groups[i].segments])
        result[module] = by_sets[targeted_by]
    return result


@dataclass
class LoraBatch:
    groups: list[AdapterSegments]
    a_pages: dict[str, torch.Tensor]  # module -> [L, P, in] pool buffer
    b_pages: dict[str, torch.Tensor]  # module -> [L, P, out] pool buffer
    num_tokens: int = 0  # tokens in the step (the Triton plan's row space)
    kernels: str = "torch"  # kernels/backend.py: "torch" or "triton"
    # triton only: module -> the kernel for its segments of >= LONG_SEGMENT tokens (default: the tiles)
    prefill_paths: Mapping[str, PrefillPath] | None = None
    plan: dict[str, object] = field(init=False)

    def __post_init__(self) -> None:
        self.plan = {}
        planned: dict[tuple[tuple[int, ...], PrefillPath], object] = {}
        has_long: dict[tuple[int, ...], bool] = {}  # per targeting set: modules share its segments
        for module, (targeting, segments) in segments_by_targets(self.groups, self.a_pages).items():
            if targeting not in has_long:
                has_long[targeting] = any(s.end - s.start >= LONG_SEGMENT for s in segments)
            # Nothing long (a decode step): modules of every path share one tile plan.
            path = (self.prefill_paths or {}).get(module, DECODE_TILES) if has_long[targeting] else DECODE_TILES
            if (targeting, path) not in planned:
                planned[targeting, path] = self._plan(segments, path)
            self.plan[module] = planned[targeting, path]

    def _plan(self, segments: list[Segment], path: PrefillPath) -> object:
        if self.kernels == "triton":
            return self._plan_triton(segments, path)
        return (gather_single_token_segments(segments), [s for s in segments if s.end - s.start > 1])

    def _plan_triton(self, segments: list[Segment], path: PrefillPath) -> list:
        """Tile plans and grouped segment lists to run in turn (they cover disjoint tokens)."""
        device = segments[0].pages.device
        if path == DECODE_TILES:  # one tiled plan for decode rows and prefill segments alike
            return [build_lora_plan(segments, self.num_tokens, device)]
        long = [s for s in segments if s.end - s.start >= LONG_SEGMENT]
        short = [s for s in segments if s.end - s.start < LONG_SEGMENT]
        return ([build_lora_plan(short, self.num_tokens, device)] if short else []) + \
            [plan_path(path, long, self.num_tokens, device)]

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layer: int,
               modules: list[str], columns: list[int]) -> torch.Tensor:
        """The layers' seam: F.linear(x, weight, bias), then each module's LoRA on its columns."""
        y = F.linear(x, weight, bias)
        if len(modules) == 1:
            return self.apply(y, x, layer, modules[0])
        return self.apply_fused(y, x, layer, modules, columns)

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """y [T, out] += LoRA(x [T, in]) for every token whose adapter targets `module`."""
        planned = self.plan.get(module)
        if planned is None:
            return y
        a_pages, b_pages = self.a_pages[module][layer], self.b_pages[module][layer]
        if self.kernels == "triton":
            for part in planned:
                run_planned(y, x, a_pages, b_pages, part)
            return y
        gathered, multi = planned
        if gathered is not None:
            lora_gathered(y, x, a_pages, b_pages, gathered.rows, gathered.pages, gathered.scales)
        if multi:
            lora_grouped(y, x, a_pages, b_pages, multi)
        return y

    def apply_fused(self, y: torch.Tensor, x: torch.Tensor, layer: int, modules: list[str],
                    columns: list[int]) -> torch.Tensor:
        """apply() for each module on its columns of y (one fused GEMM's output, module i from
        columns[i]): with the Triton kernels one shrink and one expand launch for all of them
        when their plans allow (a decode step's usually do), else one pair per module."""
        slices = self._slices(layer, modules, columns) if self.kernels == "triton" else None
        if slices is None:
            for module, column in zip(modules, columns):
                self.apply(y[:, column:column + self.b_pages[module].shape[-1]], x, layer, module)
        elif slices:
            lora_shrink_expand_slices(y, x, slices)
        return y

    def _slices(self, layer: int, modules: list[str], columns: list[int]) -> list[LoraSlice] | None:
        """The targeted modules as slices of one launch, or None when their plans cannot share one
        (a prefill's long segments take another path, or targeting sets tile differently)."""
        slices = []
        for module, column in zip(modules, columns):
            planned = self.plan.get(module)
            if planned is None:
                continue
            if len(planned) != 1 or not isinstance(planned[0], LoraTritonPlan):
                return None
            slices.append(LoraSlice(self.a_pages[module][layer], self.b_pages[module][layer], planned[0], column))
        shapes = {(s.plan.num_tiles, s.plan.block_m, s.plan.block_r) for s in slices}
        return slices if len(shapes) <= 1 else None
