"""Inference fixtures: the tiny checkpoint and real PEFT adapters built on it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.inference.peft_adapters import VARIED_SPECS, build_peft_adapter


@pytest.fixture(scope="session")
def varied_adapters(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Six PEFT adapters: ranks 2-32, several alphas, rsLoRA on/off, different targets."""
    root = tmp_path_factory.mktemp("adapters")
    return {spec.name: build_peft_adapter(tiny_model_dir, root / spec.name, spec) for spec in VARIED_SPECS}
