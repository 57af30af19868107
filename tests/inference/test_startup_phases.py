"""A node's start, phase by phase (services/inference/startup_phases.py): what an operator waits for."""

from __future__ import annotations

import logging
import time

import pytest

from services.inference.config import InferenceConfig
from services.inference.node import Node
from services.inference.startup_phases import StartupPhases


def test_phases_keep_their_order_and_a_repeated_phase_adds_up():
    phases = StartupPhases("cpu")
    with phases.phase("weights"):
        time.sleep(0.01)
    with phases.phase("decode graphs"):
        pass
    with pytest.raises(RuntimeError), phases.phase("weights"):  # a phase that fails still counts
        time.sleep(0.01)
        raise RuntimeError("checkpoint unreadable")
    assert list(phases.seconds) == ["weights", "decode graphs"]
    assert phases.seconds["weights"] >= 0.02 and phases.total == sum(phases.seconds.values())
    assert phases.summary().startswith(f"{phases.total:.1f} s (weights ") and "decode graphs 0.0 s" in phases.summary()


@pytest.mark.parametrize("kernels, graphs, expected", [
    ("torch", "off", ["weights", "prefill LoRA tuning"]),
    # The static twin of the captured graphs builds every variant's buffers and plans on CPU.
    ("triton", "static", ["weights", "prefill LoRA tuning", "decode graphs"]),
])
def test_a_node_reports_how_long_each_phase_of_its_start_took(tiny_model_dir, tmp_path, caplog, kernels, graphs,
                                                            expected):
    (tmp_path / "adapters").mkdir()
    with caplog.at_level(logging.INFO, logger="loraplex"):
        node = Node.build(InferenceConfig(base_model=tiny_model_dir, adapter_dir=tmp_path / "adapters", kv_cache_mb=2,
                                          kernels=kernels, cuda_graphs=graphs, max_num_seqs=4))
    try:
        assert list(node.startup_seconds) == expected
        assert all(seconds >= 0 for seconds in node.startup_seconds.values())
        assert node.startup_seconds["weights"] > 0
        ready = [record.getMessage() for record in caplog.records if "engine ready in" in record.getMessage()]
        assert len(ready) == 1 and all(f"{phase} " in ready[0] for phase in expected), ready
    finally:
        node.close()
