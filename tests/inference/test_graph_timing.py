"""GraphTimer (kernels/graph_timing.py): what start-up tuning times decode launches with.

Needs a GPU (CUDA graphs); the device script runs it. Nothing here asserts a speed: what is
checked is that the call is replayed from a graph as often as documented and that tuning with
the default timer measures every candidate, and every beside-the-GEMM mode, on a real decode shape.
"""

from __future__ import annotations

import math

import pytest
import torch

from services.inference.kernels.decode_lora_tuning import DecodeLaunch, LaunchShape, candidates, tune_decode_lora
from services.inference.kernels.graph_timing import GraphTimer
from services.inference.kernels.streams import BESIDE_MODES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph replay needs a GPU")


def test_the_call_is_replayed_from_a_graph_as_often_as_documented():
    counter = torch.zeros((), dtype=torch.int64, device="cuda")
    timer = GraphTimer("cuda", calls=4, replays=3, flush_bytes=2**20)
    us = timer(lambda: counter.add_(1))
    torch.cuda.synchronize()
    # One warm-up, then the graph of 4 calls replayed once to upload it and 3 times timed; the
    # flush-only graph never runs the call.
    assert counter.item() == 1 + 4 * (1 + 3)
    assert math.isfinite(us) and us >= 0


def test_tuning_with_the_default_timer_measures_every_candidate():
    shape = LaunchShape(16, 16, 4096, (4096, 1024, 1024))
    tuning = tune_decode_lora([shape], torch.bfloat16, "cuda")
    outcomes, chosen = tuning.report[shape.name], tuning.launches[shape]
    with_gemm = {DecodeLaunch(chosen.block_n, chosen.split_k, mode).name for mode in BESIDE_MODES}
    assert set(outcomes) == {launch.name for launch in candidates(shape, "cuda")} | with_gemm
    assert all(isinstance(us, float) and us > 0 for us in outcomes.values()), outcomes
    assert tuning.beside_mode(shape) in BESIDE_MODES and shape in tuning.beside
