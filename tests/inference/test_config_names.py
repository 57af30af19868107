"""The name a node serves its base model under: --base-model-name, else the checkpoint folder's
name (a fixed default once named every checkpoint "tiny", so a Llama node answered requests for
the tiny model and the Registry's "tiny" pointed at whatever a node loaded)."""

from __future__ import annotations

from pathlib import Path

from services.inference.config import InferenceConfig


def test_the_base_model_is_named_after_its_folder_unless_named():
    assert InferenceConfig(base_model=Path("/models/llama-3-8b/")).resolved_base_model_name == "llama-3-8b"
    named = InferenceConfig(base_model=Path("/models/llama-3-8b"), base_model_name="base-llm")
    assert named.resolved_base_model_name == "base-llm"
