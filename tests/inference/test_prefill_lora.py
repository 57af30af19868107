"""--prefill-lora: the start-up choice of the kernel for prefill segments (kernels/prefill_lora.py),
and LoraBatch running each choice against the reference.

Timings are injected (a GPU's are what the choice is for; tests never time things): what is
checked is that the choice follows the measurements, and that only candidates that ran and
matched the reference are measured at all.
"""

from __future__ import annotations

import pytest
import torch

from services.inference.adapters.batch import AdapterSegments, LoraBatch
from services.inference.config import InferenceConfig
from services.inference.kernels import prefill_lora
from services.inference.kernels.prefill_lora import (CANDIDATES, DECODE_TILES, GROUPED, TILES, PrefillPath,
                                                     choose_prefill_paths, parse_prefill_path, resolve_prefill_lora)
from services.inference.kernels.reference import Segment, lora_segments

SHAPES = {"q_proj": (64, 96), "o_proj": (64, 96), "down_proj": (96, 48)}
TRIAL = dict(tokens=80, adapters=3, rank=4)


def timings(by_name: dict[str, float], measured: list[str]):
    def timer(path: PrefillPath, call) -> float:
        call()  # the call the node would time must run
        measured.append(path.name)
        return by_name[path.name]
    return timer


def test_the_fastest_candidate_that_matches_the_reference_is_chosen_per_shape(triton_device):
    measured: list[str] = []
    # On a GPU in bfloat16 (grouped_mm's CUTLASS kernel takes no float32).
    dtype = torch.float32 if triton_device == "cpu" else torch.bfloat16
    choice = choose_prefill_paths(SHAPES, dtype, triton_device, **TRIAL,
                                  timer=timings({"tiles16": 9.0, "tiles32": 7.0, "tiles64": 8.0, "grouped": 7.5},
                                                measured))
    # Every candidate ran and matched lora_segments, once per distinct shape (q and o share one).
    assert sorted(measured) == sorted([path.name for path in CANDIDATES] * 2)
    assert choice.paths == {module: PrefillPath(TILES, 32) for module in SHAPES}
    assert choice.summary() == "tiles32"
    assert choice.report == {"64->96": {"tiles16": 9.0, "tiles32": 7.0, "tiles64": 8.0, "grouped": 7.5},
                             "96->48": {"tiles16": 9.0, "tiles32": 7.0, "tiles64": 8.0, "grouped": 7.5}}


def test_shapes_choose_independently_and_ties_go_to_the_earlier_candidate(triton_device):
    def timer(path: PrefillPath, call) -> float:
        return 1.0 if path.kernel == GROUPED else 2.0

    def by_width(path: PrefillPath, call) -> float:  # ties everywhere: the first candidate wins
        return 5.0

    dtype = torch.float32 if triton_device == "cpu" else torch.bfloat16
    assert choose_prefill_paths(SHAPES, dtype, triton_device, **TRIAL, timer=by_width).paths["down_proj"] == \
        DECODE_TILES
    choice = choose_prefill_paths({"q_proj": (64, 96)}, dtype, triton_device, **TRIAL, timer=timer)
    assert choice.paths == {"q_proj": PrefillPath(GROUPED)}
    mixed = prefill_lora.PrefillChoice({"q_proj": PrefillPath(GROUPED), "down_proj": PrefillPath(TILES, 64)})
    assert mixed.summary() == "down_proj=tiles64 q_proj=grouped"


def test_a_candidate_that_gives_wrong_results_or_fails_is_never_measured(monkeypatch, triton_device):
    def grouped_without_scales(y, x, a_pages, b_pages, segments):  # a deliberate kernel bug
        for segment in segments:
            y[segment.start:segment.end] += (x[segment.start:segment.end] @ a_pages[segment.pages].T) @ \
                b_pages[segment.pages]
        return y

    monkeypatch.setattr(prefill_lora, "lora_grouped", grouped_without_scales)
    measured: list[str] = []
    odd_tiles = PrefillPath(TILES, 24)  # not a power of two: the kernel refuses it
    choice = choose_prefill_paths({"q_proj": (64, 96)}, torch.float32, triton_device, **TRIAL,
                                  candidates=(PrefillPath(GROUPED), odd_tiles, PrefillPath(TILES, 64)),
                                  timer=timings({"grouped": 1.0, "tiles24": 1.0, "tiles64": 3.0}, measured))
    assert measured == ["tiles64"]
    assert choice.paths == {"q_proj": PrefillPath(TILES, 64)}
    report = choice.report["64->96"]
    assert report["grouped"].startswith("wrong result: relative error")
    assert report["tiles24"].startswith("failed: ValueError: block_m must be a power of two")

    with pytest.raises(RuntimeError, match="no prefill LoRA kernel works for 64 -> 96"):
        choose_prefill_paths({"q_proj": (64, 96)}, torch.float32, triton_device, **TRIAL,
                             candidates=(PrefillPath(GROUPED),),
                             timer=timings({}, []))


def test_what_each_setting_resolves_to():
    def resolve(requested: str, kernels: str, device: str = "cpu"):
        return resolve_prefill_lora(requested, kernels, device, SHAPES, torch.float32, 64).summary()

    assert resolve("auto", "torch") == "grouped"  # the PyTorch path's own split (adapters/batch.py)
    assert resolve("auto", "triton") == "tiles16"  # no GPU: the interpreter's timings would say nothing
    assert resolve("tiles64", "triton") == "tiles64"
    assert resolve("grouped", "triton") == "grouped"
    assert parse_prefill_path("tiles32") == PrefillPath(TILES, 32)
    with pytest.raises(ValueError, match="--prefill-lora tiles64 needs --kernels triton"):
        resolve("tiles64", "torch")
    with pytest.raises(ValueError, match="--prefill-lora must be one of auto, tiles16, tiles32, tiles64, grouped"):
        resolve("cutlass", "triton")


def test_config_refuses_an_unknown_prefill_kernel(tmp_path):
    with pytest.raises(ValueError, match="--prefill-lora must be one of auto, tiles16"):
        InferenceConfig(base_model=tmp_path, prefill_lora="fastest")


def _pages(ids: list[int], device: str) -> Segment:
    return Segment(0, 0, torch.tensor(ids, device=device), 1.0, tuple(ids))


@pytest.mark.parametrize("path", CANDIDATES, ids=lambda path: path.name)
def test_lora_batch_with_each_prefill_kernel_equals_the_reference(path, triton_device):
    """A mixed step: two long prefill segments of one adapter, a short chunk, decode rows of three
    adapters, base-only rows; one adapter targets only q_proj."""
    generator = torch.Generator().manual_seed(3)
    layers, pages, tokens = 2, 40, 64
    shapes = {"q_proj": (32, 48), "down_proj": (48, 32)}
    draw = lambda *shape: torch.randn(*shape, generator=generator).to(triton_device)  # noqa: E731
    a = {m: draw(layers, pages, fan_in) for m, (fan_in, _) in shapes.items()}
    b = {m: draw(layers, pages, fan_out) for m, (_, fan_out) in shapes.items()}
    fin, legal, retail = (_pages(ids, triton_device) for ids in ([3, 9, 1, 30], [5, 6], list(range(10, 26))))
    spans = {"fin": [(0, 20), (20, 37), (50, 51)], "legal": [(37, 42), (51, 52)], "retail": [(52, 53), (53, 54)]}
    scales = {"fin": 0.5, "legal": 2.0, "retail": 0.25}
    owners = {"fin": fin, "legal": legal, "retail": retail}
    groups = [AdapterSegments([Segment(start, end, owners[key].pages, scales[key], owners[key].host_pages)
                               for start, end in spans[key]],
                              frozenset({"q_proj"}) if key == "legal" else frozenset(shapes))
              for key in spans]
    batch = LoraBatch(groups, a, b, tokens, "triton", {module: path for module in shapes})
    for module, (fan_in, fan_out) in shapes.items():
        x, y = draw(tokens, fan_in), draw(tokens, fan_out)
        want = y.clone()
        for layer in range(layers):
            targeting = [s for g in groups if module in g.modules for s in g.segments]
            expected = lora_segments(want.clone(), x, a[module][layer], b[module][layer], targeting)
            got = batch.apply(y.clone(), x, layer, module)
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
            assert torch.equal(got[54:], y[54:]), "base-only rows are untouched"


def test_warm_up_runs_each_chosen_path_at_every_rank_padding(triton_device, monkeypatch):
    """What a GPU node compiles at start-up so that no prefill waits on a compile: each module's
    path for block_r 16, 32 and 64 (max rank 40), shapes shared between modules run once."""
    ran: list[tuple[str, tuple[int, int], int]] = []

    def spy(y, x, a_pages, b_pages, planned):
        name = GROUPED if isinstance(planned, list) else f"{TILES}{planned.block_m}"
        assert a_pages.shape[0] == b_pages.shape[0]  # grouped: the rank is the pages the segment owns
        ran.append((name, (x.shape[1], y.shape[1]), planned.block_r if name != GROUPED else a_pages.shape[0]))
        return run_planned(y, x, a_pages, b_pages, planned)

    run_planned = prefill_lora.run_planned
    monkeypatch.setattr(prefill_lora, "run_planned", spy)
    choice = prefill_lora.PrefillChoice({"q_proj": PrefillPath(TILES, 64), "o_proj": PrefillPath(TILES, 64),
                                         "down_proj": PrefillPath(GROUPED)})
    dtype = torch.float32 if triton_device == "cpu" else torch.bfloat16
    done = prefill_lora.warm_up_prefill_lora(choice, SHAPES, dtype, triton_device, max_rank=40)
    expected = [("grouped", (96, 48), r) for r in (16, 32, 64)] + [("tiles64", (64, 96), r) for r in (16, 32, 64)]
    assert sorted(ran) == expected
    assert len(done) == len(expected)


def test_a_step_without_long_segments_plans_its_tiles_once_whatever_the_paths(triton_device):
    """Decode rows and short chunks run the 16-row tiles on every path, so modules whose paths
    differ share one plan (one host build and upload per step); long segments split them."""
    shapes = {"q_proj": (32, 48), "down_proj": (48, 32)}
    a = {m: torch.zeros(1, 40, fan_in, device=triton_device) for m, (fan_in, _) in shapes.items()}
    b = {m: torch.zeros(1, 40, fan_out, device=triton_device) for m, (_, fan_out) in shapes.items()}
    fin = _pages([3, 9, 1, 30], triton_device)
    paths = {"q_proj": PrefillPath(GROUPED), "down_proj": PrefillPath(TILES, 64)}

    def batch(spans) -> LoraBatch:
        segments = [Segment(start, end, fin.pages, 1.0, fin.host_pages) for start, end in spans]
        return LoraBatch([AdapterSegments(segments, frozenset(shapes))], a, b, 40, "triton", paths)

    short = batch([(0, 1), (1, 2), (5, 20)])
    assert short.plan["q_proj"] is short.plan["down_proj"] and len(short.plan["q_proj"]) == 1
    long = batch([(0, 1), (4, 36)])
    assert long.plan["q_proj"] is not long.plan["down_proj"]
    assert [type(part).__name__ for part in long.plan["q_proj"]] == ["LoraTritonPlan", "list"]
