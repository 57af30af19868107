"""--kernels: what `auto` picks, and the start-up errors for choices that cannot run."""

from __future__ import annotations

import pytest

from services.inference.config import InferenceConfig
from services.inference.kernels.backend import resolve_kernels


def test_auto_is_torch_on_cpu_and_explicit_choices_are_kept(monkeypatch):
    assert resolve_kernels("auto", "cpu") == "torch"
    assert resolve_kernels("torch", "cpu") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_kernels("triton", "cpu") == "triton"


def test_auto_is_triton_on_cuda_where_triton_imports():
    # Resolving needs no GPU: the device is only named. With Triton, `auto` also turns CUDA
    # graphs on (resolve_graph_mode), the configuration the H200 oracle run verified.
    pytest.importorskip("triton")
    assert resolve_kernels("auto", "cuda") == "triton"
    assert resolve_kernels("auto", "cuda:0") == "triton"


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_kernels("triton", "cpu")


def test_unknown_choice_is_refused_by_the_config(tmp_path):
    with pytest.raises(ValueError, match="--kernels must be one of auto, torch, triton"):
        InferenceConfig(base_model=tmp_path, kernels="cuda-graphs")
    with pytest.raises(ValueError, match="--kernels"):
        resolve_kernels("fast", "cpu")
