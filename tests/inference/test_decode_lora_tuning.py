"""--decode-lora-tuning: the start-up choice of each captured decode graph's LoRA launch knobs
(kernels/decode_lora_tuning.py), and the graphs running with what was chosen.

Timings are injected (a GPU's are what the choice is for; tests never time things): what is
checked is that the choice follows the measurements, that only launches that ran and matched
the reference are measured, and that a graph's step runs the chosen knobs and still gives the
eager forward's logits.
"""

from __future__ import annotations

import pytest
import torch

from services.inference.adapters.pool import AdapterPool
from services.inference.config import InferenceConfig
from services.inference.engine import decode_graphs
from services.inference.engine.decode_graphs import STATIC, DecodeGraphs, graph_launch_shapes
from services.inference.engine.model_runner import ModelRunner
from services.inference.kernels import decode_lora_tuning
from services.inference.kernels.decode_lora_tuning import (DecodeLaunch, DecodeLoraTuning, LaunchShape, candidates,
                                                           default_launch, launch_shapes, tune_decode_lora)
from services.inference.model.loader import random_model
from tests.inference.test_decode_graphs import BLOCK, MAX_CONTEXT, adapter, decode_step, eager_logits, randomize

FUSED = LaunchShape(4, 16, 256, (96, 32, 32))  # q|k|v-like: three slices of one input
ALONE = LaunchShape(4, 16, 256, (48,))
ALL = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def timings(by_name: dict[str, float], measured: list[str], default: float = 10.0):
    def timer(launch: DecodeLaunch, call) -> float:
        call()  # the call the node would time must run
        measured.append(launch.name)
        return by_name.get(launch.name, default)
    return timer


def test_candidates_start_with_the_default_and_are_distinct():
    llama_qkv = LaunchShape(64, 16, 4096, (4096, 1024, 1024))
    launches = candidates(llama_qkv, "cpu")
    assert launches[0] == default_launch(llama_qkv, "cpu") == DecodeLaunch(128, 3)  # 64 tiles x 3 slices
    assert len(set(launches)) == len(launches) == 9  # 128/256/512 wide x splits 3, 1, 6
    assert {launch.block_n for launch in launches} == {128, 256, 512}
    # Rank padding 64: no 512-wide out blocks (their B tile would spill registers).
    assert {launch.block_n for launch in candidates(LaunchShape(64, 64, 4096, (4096,)), "cpu")} == {128, 256}
    # One tile over a 512-wide input: the default split is at its cap (slices of 2 K blocks), and
    # the candidates still try 4 slices of 1 block.
    assert [launch.split_k for launch in candidates(LaunchShape(1, 16, 512, (64,)), "cpu")][:3] == [2, 1, 4]


def test_the_fastest_launch_that_matches_the_reference_is_kept(triton_device):
    measured: list[str] = []
    timer = timings({"n256_split1": 7.0, "n512_split2": 8.0}, measured)
    tuning = tune_decode_lora([FUSED, ALONE], torch.float32, triton_device, timer=timer)
    # Every candidate ran, matched lora_segments and was timed, once per shape; then the chosen
    # knobs with the GEMM in each beside mode.
    with_gemm = ["n256_split1_gemm_then_lora", "n256_split1_shrink_beside_gemm", "n256_split1_lora_beside_gemm"]
    assert sorted(measured) == sorted([c.name for c in candidates(FUSED, triton_device)]
                                      + [c.name for c in candidates(ALONE, triton_device)] + 2 * with_gemm)
    assert tuning.launches == {FUSED: DecodeLaunch(256, 1), ALONE: DecodeLaunch(256, 1)}
    assert tuning.knobs(FUSED) == {"block_n": 256, "split_k": 1}
    assert tuning.knobs(LaunchShape(8, 16, 256, (48,))) == {}  # not measured: the kernels' defaults
    assert tuning.report[FUSED.name]["n256_split1"] == 7.0
    assert tuning.beside == {FUSED: "off", ALONE: "off"}  # all timed alike: the default
    assert tuning.summary() == "measured: 2 of 2 shapes off the default (n256_split1 x2); LoRA beside the GEMM: off x2"
    assert DecodeLoraTuning().summary() == "defaults"


def test_the_beside_mode_measured_fastest_with_the_gemm_is_kept(triton_device, monkeypatch):
    default = default_launch(ALONE, triton_device).name

    def tuned(by_name: dict[str, float]):
        return tune_decode_lora([ALONE], torch.float32, triton_device, timer=timings(by_name, []))
    tuning = tuned({f"{default}_lora_beside_gemm": 6.0, f"{default}_shrink_beside_gemm": 8.0})
    assert tuning.beside == {ALONE: "lora"}
    assert tuning.beside_mode(ALONE) == "lora" and tuning.beside_mode(LaunchShape(8, 16, 256, (48,))) == "off"
    assert tuning.summary().endswith("LoRA beside the GEMM: lora x1")
    assert tuned({f"{default}_shrink_beside_gemm": 8.0, f"{default}_lora_beside_gemm": 9.9}).beside == {ALONE: "shrink"}
    # Each mode is checked against x @ W.T + LoRA before it is timed: a wrong one is dropped.
    real = decode_lora_tuning.linear_with_lora

    def wrong_beside(x, weight, bias, launch, mode, side_stream):
        out = real(x, weight, bias, launch, mode, side_stream)
        return out + 1.0 if mode == "lora" else out

    monkeypatch.setattr(decode_lora_tuning, "linear_with_lora", wrong_beside)
    measured: list[str] = []
    checked = tune_decode_lora([ALONE], torch.float32, triton_device, timer=timings({}, measured))
    assert checked.report[ALONE.name][f"{default}_lora_beside_gemm"].startswith("wrong result")
    assert f"{default}_shrink_beside_gemm" in measured and f"{default}_lora_beside_gemm" not in measured


def test_a_gain_within_the_noise_keeps_the_default(triton_device):
    default = default_launch(ALONE, triton_device).name
    slightly = tune_decode_lora([ALONE], torch.float32, triton_device,
                                timer=timings({default: 10.0, "n256_split1": 9.8}, []), beside_modes=())
    assert slightly.launches[ALONE] == default_launch(ALONE, triton_device)  # 2% faster: noise
    assert slightly.summary() == "measured: 0 of 1 shapes off the default"
    clearly = tune_decode_lora([ALONE], torch.float32, triton_device,
                               timer=timings({default: 10.0, "n256_split1": 9.5}, []))
    assert clearly.launches[ALONE] == DecodeLaunch(256, 1)


def test_a_launch_that_fails_or_gives_wrong_results_is_never_timed(triton_device, monkeypatch):
    real = decode_lora_tuning.lora_shrink_expand_slices

    def wrong_at_256(y, x, slices, **knobs):
        out = real(y, x, slices, **knobs)
        return out + 1.0 if knobs.get("block_n") == 256 else out

    monkeypatch.setattr(decode_lora_tuning, "lora_shrink_expand_slices", wrong_at_256)
    odd = DecodeLaunch(24, 1)  # not a power of two: the kernel refuses it
    options = [default_launch(ALONE, triton_device), DecodeLaunch(256, 1), odd]
    measured: list[str] = []
    tuning = tune_decode_lora([ALONE], torch.float32, triton_device, timer=timings({}, measured),
                              candidates_for=lambda shape: options, beside_modes=())
    assert measured == [options[0].name]
    report = tuning.report[ALONE.name]
    assert report["n256_split1"].startswith("wrong result: relative error")
    assert report[odd.name].startswith("failed: ValueError: block_n must be a power of two")
    # A shape whose default launch fails keeps no choice: the defaults stand for it.
    broken = tune_decode_lora([ALONE], torch.float32, triton_device, timer=timings({}, []),
                              candidates_for=lambda shape: [odd, DecodeLaunch(128, 1)])
    assert broken.launches == {} and broken.knobs(ALONE) == {}


def test_launch_shapes_cover_each_group_capacity_and_padding(tiny_model_dir):
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    pool = AdapterPool(args, 64)
    widths = pool.shapes()
    unfused = graph_launch_shapes(model, pool, max_batch=20, max_rank=32)
    # Each module alone, modules of one shape measured once (q and o, k and v, gate and up here),
    # x capacities 1, 2, 4, 8, 16, 20 x paddings 16, 32.
    assert {(s.in_features, s.outs) for s in unfused} == {(i, (o,)) for i, o in widths.values()}
    assert len(unfused) == len(set(widths.values())) * 6 * 2
    model.use_fused_ops(True)
    shapes = graph_launch_shapes(model, pool, max_batch=20, max_rank=32)
    qkv = tuple(widths[m][1] for m in ("q_proj", "k_proj", "v_proj"))
    assert {s.outs for s in shapes} == {qkv, (widths["o_proj"][1],), (widths["gate_proj"][1],) * 2,
                                        (widths["down_proj"][1],)}
    assert {s.num_tiles for s in shapes} == {1, 2, 4, 8, 16, 20} and {s.block_r for s in shapes} == {16, 32}
    assert len(shapes) == 4 * 6 * 2
    with pytest.raises(ValueError, match="share one input width"):
        launch_shapes([[(64, 32), (96, 32)]], [16], [16])


def test_a_graph_runs_the_tuned_launches_and_gives_the_eager_logits(tiny_model_dir, triton_device, monkeypatch):
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device=triton_device)
    model.use_fused_ops(True)
    pool = AdapterPool(args, 64, device=triton_device)
    for layer in model.attention_layers():
        layer.k_cache = torch.zeros(41, BLOCK, args.num_kv_heads, args.head_dim, device=triton_device)
        layer.v_cache = torch.zeros_like(layer.k_cache)
    shapes = graph_launch_shapes(model, pool, max_batch=8, max_rank=16)
    # Unlike any default (128 wide), and gate|up's 128-wide slices take two out blocks each; not
    # narrower: the interpreter runs each program in Python.
    tuning = DecodeLoraTuning({shape: DecodeLaunch(64, 1) for shape in shapes})
    graphs = DecodeGraphs(model, pool, mode=STATIC, max_batch=8, max_rank=16, max_context=MAX_CONTEXT,
                          block_size=BLOCK, scratch_slot=40 * BLOCK, device=torch.device(triton_device),
                          tuning=tuning)
    launched: list[dict] = []

    class Recording(decode_graphs.SlicedLora):  # every launch pair: q|k|v, o, gate|up, down
        def __init__(self, *arguments, **knobs):
            launched.append(knobs)
            super().__init__(*arguments, **knobs)
    monkeypatch.setattr(decode_graphs, "SlicedLora", Recording)
    randomize(graphs)
    packed = decode_step(6, [adapter(0, 3, [3, 4], 0.5, ALL), adapter(3, 6, [9, 10, 11], 2.0, ALL)])
    step = graphs.choose(packed)
    logits = graphs.run(step, packed).clone()
    assert len(launched) == 4 * args.num_layers and all(knobs == {"block_n": 64, "split_k": 1} for knobs in launched)
    torch.testing.assert_close(logits, eager_logits(graphs, packed), rtol=1e-4, atol=1e-4)


def test_unknown_settings_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="--decode-lora-tuning must be one of auto, off"):
        InferenceConfig(base_model=tiny_model_dir, decode_lora_tuning="fast")
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="decode_lora must be one of auto, off"):
        ModelRunner(model, AdapterPool(args, 8), 4, BLOCK, decode_lora="fast")


def test_without_captured_graphs_auto_measures_nothing(tiny_model_dir, triton_device):
    """Timings under the CPU interpreter or of eager steps say nothing about a GPU's graphs."""
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device=triton_device)
    runner = ModelRunner(model, AdapterPool(args, 8, device=triton_device), 4, BLOCK, device=triton_device,
                         kernels="triton", graphs=STATIC, max_graph_batch=4, max_context=MAX_CONTEXT, max_rank=16)
    assert runner.decode_lora.report == {} and runner.decode_lora.summary() == "defaults"


def test_runners_built_again_in_one_process_measure_the_same_shapes_once(tiny_model_dir, monkeypatch):
    from services.inference.engine import model_runner

    calls: list[tuple] = []

    def counting(launches, dtype, device, beside_modes):
        calls.append((len(launches), dtype, tuple(beside_modes)))
        return DecodeLoraTuning()
    monkeypatch.setattr(model_runner, "tune_decode_lora", counting)
    monkeypatch.setattr(model_runner, "_MEASURED", {})
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    pool = AdapterPool(args, 8)
    first = model_runner.measure_decode_lora(model, pool, torch.device("cpu"), 4, 16, ("off", "lora"))
    assert model_runner.measure_decode_lora(model, pool, torch.device("cpu"), 4, 16, ("off", "lora")) is first
    model_runner.measure_decode_lora(model, pool, torch.device("cpu"), 4, 16, ())  # other modes: measured
    model_runner.measure_decode_lora(model, pool, torch.device("cpu"), 8, 16, ())  # more capacities: measured
    assert [beside for _, _, beside in calls] == [("off", "lora"), (), ()]
    assert calls[2][0] > calls[1][0] == calls[0][0]  # batch 8 adds capacity-8 shapes


def test_a_node_whose_measuring_fails_serves_with_the_defaults_and_says_why(tiny_model_dir, monkeypatch):
    from services.inference.engine import model_runner

    def broken(*arguments, **options):
        raise RuntimeError("out of memory for the trials")
    monkeypatch.setattr(model_runner, "tune_decode_lora", broken)
    model, args = random_model(tiny_model_dir, dtype=torch.float32, device="cpu")
    tuning = model_runner.measure_decode_lora(model, AdapterPool(args, 8), torch.device("cpu"), 4, 16, ())
    assert tuning.launches == {} and tuning.beside == {} and tuning.knobs(ALONE) == {}
    assert tuning.summary() == "defaults: measuring failed (RuntimeError: out of memory for the trials)"
