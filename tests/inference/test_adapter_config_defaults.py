"""An adapter_config.json without `lora_alpha` (hand-written; PEFT always writes it) means what
PEFT and the Registry take it to mean: PEFT's default alpha, 8. The node used to take alpha = r,
scaling every such adapter of rank r != 8 by the wrong factor (r / 8 too much or too little)."""

from __future__ import annotations

import json

import pytest
from peft import LoraConfig

from services.inference.adapters.weights import PEFT_DEFAULT_ALPHA, parse_adapter
from services.inference.model.config import load_model_args
from services.registry.validation.lora_config import DEFAULT_ALPHA
from tests.inference.peft_adapters import AdapterSpec, build_peft_adapter


@pytest.mark.parametrize("rank,rslora", [(16, False), (4, True)])
def test_a_config_without_lora_alpha_scales_as_peft_does(tiny_model_dir, tmp_path, rank, rslora):
    folder = build_peft_adapter(tiny_model_dir, tmp_path / "a", AdapterSpec("a", rank, 8, ("q_proj",), rslora=rslora))
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    weights = (folder / "adapter_model.safetensors").read_bytes()
    parsed = parse_adapter(config, weights, load_model_args(tiny_model_dir))
    peft_alpha = LoraConfig(r=rank).lora_alpha
    assert peft_alpha == DEFAULT_ALPHA == PEFT_DEFAULT_ALPHA
    assert parsed.scaling == pytest.approx(peft_alpha / (rank ** 0.5 if rslora else rank))
