"""Real PEFT LoRA adapters for tests, built offline on the tiny model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    r: int
    alpha: float
    targets: tuple[str, ...] = ALL_MODULES
    rslora: bool = False
    seed: int = 0


# Ranks 2..32, alphas, rsLoRA on/off and different target-module subsets.
VARIED_SPECS = (
    AdapterSpec("fin", 2, 4, ("q_proj", "v_proj"), seed=1),
    AdapterSpec("legal", 4, 16, ALL_MODULES, seed=2),
    AdapterSpec("health", 8, 8, ("gate_proj", "up_proj", "down_proj"), rslora=True, seed=3),
    AdapterSpec("retail", 16, 32, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=4),
    AdapterSpec("travel", 32, 16, ALL_MODULES, rslora=True, seed=5),
    AdapterSpec("games", 6, 12, ("o_proj", "down_proj"), seed=6),
)


def build_peft_adapter(base_dir: Path, out_dir: Path, spec: AdapterSpec, std: float = 0.15) -> Path:
    """Saves a PEFT adapter with random (seeded, non-zero) A and B so it changes outputs."""
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                        use_rslora=spec.rslora, lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)
    model.save_pretrained(out_dir)
    return out_dir
