"""Prefill LoRA: which kernel runs the long segments of a step, per projection shape, chosen by
measurement on the node's own GPU.

There are two ways to run the LoRA of prefill segments: the CUTLASS grouped GEMM
(torch._grouped_mm, kernels/grouped.py) and the Triton tiles of triton_lora.py at 16, 32 or 64
rows. Which is faster depends on the shape, the GPU and the library versions (DESIGN.md §4:
grouped_mm took 69 µs for 4096 tokens over 8 adapters at 4096 -> 4096, 2.9x its byte floor;
wider tiles re-read an adapter's pages fewer times but leave more rows idle at a segment's
end), so a node does not guess. At start-up it runs every candidate on a prefill step of its
own chunk size, drops those that fail or disagree with the reference (kernels/reference.py),
and keeps the fastest for each (in, out) shape.

Only segments of at least LONG_SEGMENT tokens take the chosen path. Decode rows and short runs
stay on the 16-row tiles that the CUDA graphs replay: a grouped GEMM would pay a group per row.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from services.inference.kernels.grouped import lora_grouped
from services.inference.kernels.reference import Segment, lora_segments
from services.inference.kernels.triton_lora import (DEFAULT_BLOCK_M, LoraTritonPlan, build_lora_plan,
                                                    lora_shrink_expand, rank_paddings)

TILES, GROUPED = "tiles", "grouped"
LONG_SEGMENT = DEFAULT_BLOCK_M  # a segment that fills a decode tile is worth a prefill kernel


@dataclass(frozen=True, order=True)
class PrefillPath:
    kernel: str  # TILES or GROUPED
    block_m: int = DEFAULT_BLOCK_M  # rows per tile (TILES only)

    @property
    def name(self) -> str:
        return f"{TILES}{self.block_m}" if self.kernel == TILES else GROUPED


DECODE_TILES = PrefillPath(TILES, DEFAULT_BLOCK_M)
CANDIDATES = (DECODE_TILES, PrefillPath(TILES, 32), PrefillPath(TILES, 64), PrefillPath(GROUPED))
CHOICES = ("auto", *(path.name for path in CANDIDATES))

Planned = LoraTritonPlan | list[Segment]  # what a path runs: a tile plan, or the segments for grouped_mm


def parse_prefill_path(name: str) -> PrefillPath:
    """The candidate called `name` (e.g. tiles64, grouped); ValueError for anything else."""
    for path in CANDIDATES:
        if path.name == name:
            return path
    raise ValueError(f"--prefill-lora must be one of {', '.join(CHOICES)}, got {name!r}")


def plan_path(path: PrefillPath, segments: Sequence[Segment], num_tokens: int, device: torch.device) -> Planned:
    """The host-side preparation of `path` for these segments (once per step, for every layer)."""
    if path.kernel == GROUPED:
        return list(segments)
    return build_lora_plan(segments, num_tokens, device, path.block_m)


def run_planned(y: torch.Tensor, x: torch.Tensor, a_pages: torch.Tensor, b_pages: torch.Tensor,
                planned: Planned) -> torch.Tensor:
    """Semantics: lora_segments(y, x, a_pages, b_pages, the planned segments), in place."""
    if isinstance(planned, LoraTritonPlan):
        return lora_shrink_expand(y, x, a_pages, b_pages, planned)
    return lora_grouped(y, x, a_pages, b_pages, planned)


@dataclass
class PrefillChoice:
    paths: dict[str, PrefillPath]  # module -> the path its long segments take
    # "in->out" -> candidate name -> median µs, or why it was dropped (for logs and benchmarks)
    report: dict[str, dict[str, float | str]] = field(default_factory=dict)

    @classmethod
    def fixed(cls, path: PrefillPath, modules) -> PrefillChoice:
        return cls({module: path for module in modules})

    def summary(self) -> str:
        """e.g. "tiles64" when every module agrees, else "down_proj=grouped q_proj=tiles32 ..."."""
        names = {path.name for path in self.paths.values()}
        if len(names) == 1:
            return names.pop()
        return " ".join(f"{module}={path.name}" for module, path in sorted(self.paths.items()))


@dataclass
class _Trial:
    """A synthetic prefill step for one shape: `tokens` tokens over `adapters` equal segments."""

    x: torch.Tensor
    a_pages: torch.Tensor
    b_pages: torch.Tensor
    y0: torch.Tensor
    segments: list[Segment]

    @cached_property
    def want(self) -> torch.Tensor:
        """The reference result in float32."""
        return lora_segments(self.y0.to(torch.float32, copy=True), self.x.float(), self.a_pages.float(),
                             self.b_pages.float(), self.segments)


def _trial(in_features: int, out_features: int, tokens: int, adapters: int, rank: int,
           dtype: torch.dtype, device: torch.device) -> _Trial:
    generator = torch.Generator().manual_seed(in_features * 7 + out_features)

    def draw(*shape: int, scale: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * scale).to(device, dtype)

    adapters = max(1, min(adapters, tokens // LONG_SEGMENT))
    pages = torch.randperm(adapters * rank, generator=generator)  # an adapter's pages lie scattered
    bounds = [tokens * i // adapters for i in range(adapters + 1)]
    segments = [Segment(bounds[i], bounds[i + 1], pages[i * rank:(i + 1) * rank].to(device), 0.5 + i / adapters,
                        tuple(pages[i * rank:(i + 1) * rank].tolist())) for i in range(adapters)]
    return _Trial(draw(tokens, in_features, scale=1.0), draw(adapters * rank, in_features, scale=in_features ** -0.5),
                  draw(adapters * rank, out_features, scale=0.05), draw(tokens, out_features, scale=1.0), segments)


def cuda_median_us(fn: Callable[[], object], warmup_ms: float = 5, rep_ms: float = 25) -> float:
    """Median µs of fn on the current CUDA device, L2 flushed before each call (as a layer's
    pages would be in a real step): triton.testing.do_bench, repeating for about rep_ms."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") * 1000


def choose_prefill_paths(shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype, device: torch.device | str, *,
                         tokens: int, adapters: int = 8, rank: int = 16,
                         candidates: Sequence[PrefillPath] = CANDIDATES,
                         timer: Callable[[PrefillPath, Callable[[], object]], float] | None = None) -> PrefillChoice:
    """Semantics: for each module of `shapes` (module -> (in, out)), the candidate with the lowest
    timer(candidate, call) (default: cuda_median_us(call)) on a step of `tokens` prefill tokens
    over `adapters` adapters of `rank`, among those that ran and matched lora_segments in
    float32 (relative error <= 3e-2 for 16-bit dtypes, 1e-4 for float32). Modules with the
    same shape share one measurement; ties go to the earlier candidate. RuntimeError when no
    candidate works for a shape.
    """
    device = torch.device(device)
    timer = timer or (lambda _, call: cuda_median_us(call))
    by_shape: dict[tuple[int, int], PrefillPath] = {}
    report: dict[str, dict[str, float | str]] = {}
    for shape in sorted(set(shapes.values())):
        trial = _trial(*shape, tokens, adapters, rank, dtype, device)
        outcomes = {path.name: _try(path, trial, timer) for path in candidates}
        report[f"{shape[0]}->{shape[1]}"] = outcomes
        timed = [(outcomes[path.name], i) for i, path in enumerate(candidates)
                 if isinstance(outcomes[path.name], float)]
        if not timed:
            raise RuntimeError(f"no prefill LoRA kernel works for {shape[0]} -> {shape[1]} on {device}: {outcomes}")
        by_shape[shape] = candidates[min(timed)[1]]
    return PrefillChoice({module: by_shape[shape] for module, shape in shapes.items()}, report)


def _try(path: PrefillPath, trial: _Trial, timer: Callable[[PrefillPath, Callable[[], object]], float]) -> float | str:
    """The candidate's time on the trial, or why it was dropped."""
    tolerance = 1e-4 if trial.x.dtype == torch.float32 else 3e-2
    try:
        planned = plan_path(path, trial.segments, trial.x.shape[0], trial.x.device)
        got = run_planned(trial.y0.clone(), trial.x, trial.a_pages, trial.b_pages, planned)
        error = ((got.float() - trial.want).abs().max() / trial.want.abs().max().clamp(min=1e-12)).item()
        if not error <= tolerance:  # also NaN
            return f"wrong result: relative error {error:.3g} > {tolerance:g}"
        y = trial.y0.clone()
        return float(timer(path, lambda: run_planned(y, trial.x, trial.a_pages, trial.b_pages, planned)))
    except Exception as exc:  # e.g. grouped_mm without support for this GPU or dtype: not a candidate here
        return f"failed: {type(exc).__name__}: {exc}"


def warm_up_prefill_lora(choice: PrefillChoice, shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype,
                         device: torch.device | str, max_rank: int) -> set[tuple[PrefillPath, tuple[int, int], int]]:
    """Runs each module's prefill path once for every rank padding up to max_rank, on one
    segment of that module's shape, so that no request's prefill waits on a Triton compile
    (a compile takes seconds; the measurement compiled rank 16 only, and the decode graphs
    only the 16-row tiles). Returns the (path, (in, out), block_r) it ran."""
    device = torch.device(device)
    zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
    ran = set()
    for path, (in_features, out_features) in sorted({(p, shapes[m]) for m, p in choice.paths.items()}):
        tokens = max(LONG_SEGMENT, path.block_m)
        for block_r in rank_paddings(max_rank):
            pages = tuple(range(block_r))
            segment = Segment(0, tokens, torch.tensor(pages, device=device), 1.0, pages)
            run_planned(zeros(tokens, out_features), zeros(tokens, in_features), zeros(block_r, in_features),
                        zeros(block_r, out_features), plan_path(path, [segment], tokens, device))
            ran.add((path, (in_features, out_features), block_r))
    return ran


def resolve_prefill_lora(requested: str, kernels: str, device: torch.device | str,
                         shapes: Mapping[str, tuple[int, int]], dtype: torch.dtype, tokens: int) -> PrefillChoice:
    """What a node's prefill segments run (--prefill-lora), per module of `shapes`.

    PyTorch kernels: grouped_mm for every segment of two tokens or more (adapters/batch.py), so
    a named path is a configuration error. Triton kernels: a named path for every module, or
    with `auto` the measured choice on CUDA and the 16-row tiles elsewhere (timings under
    Triton's CPU interpreter say nothing about a GPU).
    """
    if requested not in CHOICES:
        raise ValueError(f"--prefill-lora must be one of {', '.join(CHOICES)}, got {requested!r}")
    if kernels != "triton" and requested != "auto":
        raise ValueError(f"--prefill-lora {requested} needs --kernels triton (PyTorch kernels run grouped_mm)")
    if kernels == "triton" and requested != "auto":
        return PrefillChoice.fixed(parse_prefill_path(requested), shapes)
    if kernels == "triton" and torch.device(device).type == "cuda":
        return choose_prefill_paths(shapes, dtype, device, tokens=tokens)
    return unmeasured_prefill_lora(kernels, shapes)


def unmeasured_prefill_lora(kernels: str, modules) -> PrefillChoice:
    """The choice without a measurement: grouped_mm under PyTorch kernels, the 16-row tiles
    under Triton's."""
    return PrefillChoice.fixed(DECODE_TILES if kernels == "triton" else PrefillPath(GROUPED), modules)
