"""Decode LoRA launches: the expand's out-block width and the shrink's split-K for each shape a
CUDA graph replays, chosen by measurement on the node's own GPU at start-up.

Why measured, not fixed: a decode LoRA program moves a few KB behind a chain of dependent
loads, so its time is set by how many programs run and how many waves they take, which
depends on the tile count, the rank padding, the projection's widths and the GPU (the H200
ran gate|up's expand at 64 tiles as 14,336 programs of 4 KB each at 128-wide out blocks).
One default cannot be right for batch 1 and batch 64 alike, and GPU sessions are too rare to
hand-tune a table per GPU. So, as kernels/prefill_lora.py does for prefill segments, a node
times a few launches for every (tile capacity, rank padding, launch group) its graphs will
capture, on a synthetic step of one token per tile (each tile a different adapter, its pages
scattered: the decode case of many tenants), drops those that fail or disagree with the
reference, and keeps the fastest. The graphs take the choice when they are captured, so a
replay pays nothing for it.

Then, with the knobs chosen, where the LoRA runs against the projection's base GEMM
(kernels/streams.py: after it, its shrink beside it on a second stream, or all of it beside
it) is timed the same way on the whole projection, GEMM included, since what a second stream
hides depends on how much of the GPU the GEMM leaves idle at that shape.

A launch group is what one LoRA launch pair serves: q|k|v and gate|up (fused projections,
kernels/triton_lora.lora_shrink_expand_slices), o and down alone.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from services.inference.kernels.graph_timing import GraphTimer
from services.inference.kernels.reference import Segment, lora_segments
from services.inference.kernels.streams import BESIDE_MODES, linear_with_lora, side_stream_for
from services.inference.kernels.triton_lora import (DEFAULT_BLOCK_K, DEFAULT_BLOCK_M, DEFAULT_BLOCK_N, LoraSlice,
                                                    SlicedLora, _k_slices, build_lora_plan, choose_split_k,
                                                    lora_shrink_expand_slices)

CHOICES = ("auto", "off")
# A candidate must beat the default launch by this fraction to replace it: timings of a few µs
# jitter by a few percent, and a choice that flips with the noise is worth nothing.
MIN_GAIN = 0.03
# Wider out blocks hold BLOCK_R x BLOCK_N of B in registers: 512 at rank padding 64 would spill
# (sm_90 compile: 122 registers at 16 x 512); paddings past 64 keep the default width.
WIDEST_BLOCK_N = {16: 512, 32: 512, 64: 256}


# How each beside-the-GEMM mode (kernels/streams.py) is named in reports.
BESIDE_LABELS = {"off": "gemm_then_lora", "shrink": "shrink_beside_gemm", "lora": "lora_beside_gemm"}


@dataclass(frozen=True, order=True)
class DecodeLaunch:
    block_n: int  # the expand's out-block width
    split_k: int  # the shrink's K slices
    beside: str | None = None  # timed with the base GEMM, in this mode (BESIDE_MODES); None: LoRA alone

    @property
    def name(self) -> str:
        knobs = f"n{self.block_n}_split{self.split_k}"
        return knobs if self.beside is None else f"{knobs}_{BESIDE_LABELS[self.beside]}"

    @property
    def knobs(self) -> dict[str, int]:
        return {"block_n": self.block_n, "split_k": self.split_k}


@dataclass(frozen=True, order=True)
class LaunchShape:
    """What a decode launch pair's best knobs depend on."""

    num_tiles: int
    block_r: int
    in_features: int
    outs: tuple[int, ...]  # each slice's out features, in column order

    @property
    def name(self) -> str:
        return f"tiles{self.num_tiles}_r{self.block_r}_{self.in_features}->{'|'.join(map(str, self.outs))}"


@dataclass
class DecodeLoraTuning:
    """The chosen launch per shape; shapes not in it (and an empty tuning) take the defaults."""

    launches: dict[LaunchShape, DecodeLaunch] = field(default_factory=dict)
    defaults: dict[LaunchShape, DecodeLaunch] = field(default_factory=dict)  # what each shape ran without
    # shape name -> candidate name -> median µs, or why it was dropped (for logs and benchmarks)
    report: dict[str, dict[str, float | str]] = field(default_factory=dict)
    beside: dict[LaunchShape, str] = field(default_factory=dict)  # the mode measured fastest with the GEMM
    error: str | None = None  # why measuring failed (the defaults stand)
    kept_in: str | None = None  # the --tuning-cache-dir entry it was read from, if it was

    def to_json(self) -> dict:
        """What tuning_cache stores: every field but where it was kept and a failure's reason."""
        def pairs(chosen: dict) -> list:
            return [[vars(shape) | {"outs": list(shape.outs)}, value if isinstance(value, str) else vars(value)]
                    for shape, value in sorted(chosen.items())]
        return {"launches": pairs(self.launches), "defaults": pairs(self.defaults), "beside": pairs(self.beside),
                "report": self.report}

    @classmethod
    def from_json(cls, data: dict, kept_in: str | None = None) -> DecodeLoraTuning:
        def shape(fields: dict) -> LaunchShape:
            return LaunchShape(**fields | {"outs": tuple(fields["outs"])})
        return cls({shape(s): DecodeLaunch(**launch) for s, launch in data["launches"]},
                   {shape(s): DecodeLaunch(**launch) for s, launch in data["defaults"]},
                   data["report"], {shape(s): mode for s, mode in data["beside"]}, kept_in=kept_in)

    def knobs(self, shape: LaunchShape) -> dict[str, int]:
        """Keyword arguments for lora_shrink_expand_slices: {} where the defaults stand."""
        launch = self.launches.get(shape)
        return {} if launch is None else launch.knobs

    def beside_mode(self, shape: LaunchShape) -> str:
        """Where the shape's LoRA runs against its GEMM (kernels/streams.py): "off" unless measured."""
        return self.beside.get(shape, "off")

    def summary(self) -> str:
        """e.g. "measured: 12 of 44 shapes off the default (n256_split8 x7, ...)", or "defaults"."""
        if self.error is not None:
            return f"defaults: measuring failed ({self.error})"
        if not self.report:
            return "defaults"
        changed = sorted(launch.name for shape, launch in self.launches.items() if launch != self.defaults.get(shape))
        counts = {name: changed.count(name) for name in changed}
        listed = ", ".join(f"{name} x{count}" for name, count in sorted(counts.items(), key=lambda kv: -kv[1]))
        modes = sorted(self.beside.values())
        beside = ", ".join(f"{mode} x{modes.count(mode)}" for mode in dict.fromkeys(modes))
        return f"measured: {len(changed)} of {len(self.report)} shapes off the default" + \
            (f" ({listed})" if listed else "") + (f"; LoRA beside the GEMM: {beside}" if beside else "") + \
            (f"; kept in {self.kept_in}" if self.kept_in else "")


def default_launch(shape: LaunchShape, device: torch.device | str = "cuda") -> DecodeLaunch:
    """What lora_shrink_expand_slices runs without knobs."""
    split = choose_split_k(shape.num_tiles * len(shape.outs), shape.in_features, DEFAULT_BLOCK_K,
                           torch.device(device))
    return DecodeLaunch(DEFAULT_BLOCK_N, split)


def candidates(shape: LaunchShape, device: torch.device | str = "cuda") -> list[DecodeLaunch]:
    """The default first (ties keep it), then wider out blocks and half and twice its split."""
    default = default_launch(shape, device)
    splits = [default.split_k, max(1, default.split_k // 2), 2 * default.split_k]
    # Only splits that _k_slices keeps distinct: twice a split near the cap may cut `in` the same way.
    splits = list(dict.fromkeys(_k_slices(shape.in_features, s, DEFAULT_BLOCK_K)[1] for s in splits))
    widths = [w for w in (DEFAULT_BLOCK_N, 2 * DEFAULT_BLOCK_N, 4 * DEFAULT_BLOCK_N)
              if w <= WIDEST_BLOCK_N.get(shape.block_r, DEFAULT_BLOCK_N)]
    launches = [DecodeLaunch(w, s) for w in widths for s in splits]
    return [default] + [launch for launch in launches if launch != default]


def launch_shapes(groups: Iterable[Sequence[tuple[int, int]]], capacities: Iterable[int],
                  block_rs: Iterable[int]) -> list[LaunchShape]:
    """Every shape a graph captures: each group's (in, out) per slice, at each capacity and padding."""
    shapes, capacities, block_rs = set(), list(capacities), list(block_rs)
    for group in groups:
        ins = {in_features for in_features, _ in group}
        if len(ins) != 1:
            raise ValueError(f"a launch group's slices share one input width, got {sorted(ins)}")
        in_features, outs = ins.pop(), tuple(out for _, out in group)
        shapes |= {LaunchShape(c, r, in_features, outs) for c in capacities for r in block_rs}
    return sorted(shapes)


@dataclass
class _Trial:
    x: torch.Tensor
    slices: list[LoraSlice]
    y0: torch.Tensor
    want: torch.Tensor  # the reference, float32

    @property
    def tolerance(self) -> float:
        return 1e-4 if self.x.dtype == torch.float32 else 3e-2


def _trial(shape: LaunchShape, dtype: torch.dtype, device: torch.device) -> _Trial:
    """One token per tile, each tile its own adapter of rank block_r with scattered pages."""
    generator = torch.Generator().manual_seed(shape.num_tiles * 131 + shape.block_r + shape.in_features)
    tiles, rank = shape.num_tiles, shape.block_r

    def draw(*dims: int, scale: float) -> torch.Tensor:
        return (torch.randn(*dims, generator=generator) * scale).to(device, dtype)

    x = draw(tiles, shape.in_features, scale=1.0)
    y0 = draw(tiles, sum(shape.outs), scale=1.0)
    want = y0.float().clone()
    slices, column = [], 0
    for out in shape.outs:
        pages = torch.randperm(tiles * rank, generator=generator)
        segments = [Segment(t, t + 1, pages[t * rank:(t + 1) * rank].to(device), 0.5 + t / tiles,
                            tuple(pages[t * rank:(t + 1) * rank].tolist())) for t in range(tiles)]
        a_pages = draw(tiles * rank, shape.in_features, scale=shape.in_features ** -0.5)
        b_pages = draw(tiles * rank, out, scale=0.05)
        plan = build_lora_plan(segments, tiles, device, DEFAULT_BLOCK_M, block_r=rank)
        slices.append(LoraSlice(a_pages, b_pages, plan, column))
        lora_segments(want[:, column:column + out], x.float(), a_pages.float(), b_pages.float(), segments)
        column += out
    return _Trial(x, slices, y0, want)


Timer = Callable[[DecodeLaunch, Callable[[], object]], float]


def _checked_time(launch: DecodeLaunch, fresh: Callable[[], torch.Tensor], want: torch.Tensor, tolerance: float,
                  call: Callable[[], object], timer: Timer) -> float | str:
    """timer(launch, call) if fresh() matches want (float32), else why the launch was dropped."""
    try:
        got = fresh().float()
        error = ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
        if not error <= tolerance:  # also NaN
            return f"wrong result: relative error {error:.3g} > {tolerance:g}"
        return float(timer(launch, call))
    except Exception as exc:  # e.g. a width that does not compile on this GPU: not a candidate here
        return f"failed: {type(exc).__name__}: {exc}"


def _try(launch: DecodeLaunch, trial: _Trial, timer: Timer) -> float | str:
    """The launch's time on the trial (its LoRA alone), or why it was dropped."""
    y = trial.y0.clone()
    return _checked_time(launch, lambda: lora_shrink_expand_slices(trial.y0.clone(), trial.x, trial.slices,
                                                                   **launch.knobs),
                         trial.want, trial.tolerance,
                         lambda: lora_shrink_expand_slices(y, trial.x, trial.slices, **launch.knobs), timer)


def _try_beside(launch: DecodeLaunch, trial: _Trial, weight: torch.Tensor, side_stream, timer: Timer) -> float | str:
    """The launch's time with the base GEMM (weight: [sum(outs), in]) in its beside mode."""
    def project() -> torch.Tensor:
        return linear_with_lora(trial.x, weight, None, SlicedLora(trial.x, trial.slices, **launch.knobs),
                                launch.beside, side_stream)
    want = trial.x.float() @ weight.float().T + (trial.want - trial.y0.float())
    return _checked_time(launch, project, want, trial.tolerance, project, timer)


def _fastest(launches: list[DecodeLaunch], outcomes: dict[str, float | str]) -> DecodeLaunch | None:
    """The fastest launch that was timed, unless it beats the first by less than MIN_GAIN: then
    the first; None when the first (the default) was not timed."""
    first = outcomes[launches[0].name]
    if not isinstance(first, float):
        return None
    best_time, best = min((outcomes[launch.name], i) for i, launch in enumerate(launches)
                          if isinstance(outcomes[launch.name], float))
    return launches[best] if best_time < first * (1 - MIN_GAIN) else launches[0]


def tune_decode_lora(shapes: Iterable[LaunchShape], dtype: torch.dtype, device: torch.device | str, *,
                     timer: Timer | None = None,
                     candidates_for: Callable[[LaunchShape], list[DecodeLaunch]] | None = None,
                     beside_modes: Sequence[str] = BESIDE_MODES) -> DecodeLoraTuning:
    """Semantics: for each shape, the candidate (default: candidates(shape)) with the lowest
    timer(launch, call) (default: GraphTimer(device)(call)) among those that ran and matched
    lora_segments in float32 (relative error <= 3e-2 for 16-bit dtypes, 1e-4 for float32),
    unless it beats the first candidate (the default launch) by less than MIN_GAIN: then the
    first. A shape whose first candidate fails is left out (the defaults stand; its report
    says why). Then, with the chosen knobs and a random base weight of the shape, each of
    beside_modes (the first the default; kernels/streams.py) is timed as a whole projection,
    GEMM and LoRA, checked against x @ weight.T + LoRA, and chosen the same way.
    """
    device = torch.device(device)
    # Replayed from a graph with cold pages, as the decode graphs will run it (kernels/graph_timing.py).
    if timer is None:
        graph_timer = GraphTimer(device)
        timer = lambda _, call: graph_timer(call)  # noqa: E731
    candidates_for = candidates_for or (lambda shape: candidates(shape, device))
    side_stream = side_stream_for(device, len(beside_modes) > 1)
    weights: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}  # one per projection shape, all capacities
    tuning = DecodeLoraTuning()
    for shape in shapes:
        trial = _trial(shape, dtype, device)
        launches = candidates_for(shape)
        outcomes = {launch.name: _try(launch, trial, timer) for launch in launches}
        tuning.report[shape.name] = outcomes
        tuning.defaults[shape] = launches[0]
        chosen = _fastest(launches, outcomes)
        if chosen is None:
            continue
        tuning.launches[shape] = chosen
        if len(beside_modes) > 1:
            key = (shape.in_features, shape.outs)
            if key not in weights:
                weights[key] = torch.empty(sum(shape.outs), shape.in_features, dtype=dtype, device=device) \
                    .uniform_(-shape.in_features ** -0.5, shape.in_features ** -0.5)
            modes = [DecodeLaunch(chosen.block_n, chosen.split_k, mode) for mode in beside_modes]
            timed = {mode.name: _try_beside(mode, trial, weights[key], side_stream, timer) for mode in modes}
            outcomes.update(timed)
            fastest = _fastest(modes, timed)
            if fastest is not None:
                tuning.beside[shape] = fastest.beside
    return tuning
