"""Parse a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into
per-(layer, module) A/B matrices checked against the base model's shapes.

Only safetensors are read (never pickle). The Registry validates uploads first; the node
re-checks because it must never write a wrong-shaped tensor into its shared page pool.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors

from services.common.errors import InvalidArgument
from services.inference.model.config import LORA_MODULES, ModelArgs

_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)(?:\.default)?\.weight$")


@dataclass
class LoraWeights:
    """One adapter in host memory: A [r, in] and B [out, r] per (layer, module)."""

    rank: int
    scaling: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    target_modules: frozenset[str]
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]
    sha256: str

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


#: What a config without `lora_alpha` means: PEFT's LoraConfig default, as the Registry reads it.
PEFT_DEFAULT_ALPHA = 8


def _scaling(config: dict, rank: int) -> float:
    alpha = float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def parse_adapter(config: dict | str, weights: bytes, args: ModelArgs) -> LoraWeights:
    """Builds LoraWeights from the two files' contents; InvalidArgument on any mismatch."""
    config = json.loads(config) if isinstance(config, str) else config
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidArgument(f"peft_type must be LORA, got {config.get('peft_type')!r}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        raise InvalidArgument("adapters with rank_pattern/alpha_pattern are not supported yet")
    if config.get("use_dora"):
        raise InvalidArgument("DoRA adapters are not supported")
    rank = int(config.get("r", 0))
    if rank < 1:
        raise InvalidArgument(f"adapter rank r must be >= 1, got {rank}")
    shapes = args.module_shapes()
    a: dict[tuple[int, str], torch.Tensor] = {}
    b: dict[tuple[int, str], torch.Tensor] = {}
    for name, tensor in load_safetensors(weights).items():
        match = _KEY.match(name)
        if match is None:
            raise InvalidArgument(f"adapter_model.safetensors: unsupported tensor {name!r}")
        layer, module, which = int(match.group(1)), match.group(2), match.group(3)
        if layer >= args.num_layers:
            raise InvalidArgument(f"{name}: layer {layer} does not exist (base has {args.num_layers})")
        in_features, out_features = shapes[module]
        expected = (rank, in_features) if which == "A" else (out_features, rank)
        if tuple(tensor.shape) != expected:
            raise InvalidArgument(f"{name}: shape {tuple(tensor.shape)}, expected {expected}")
        if not torch.isfinite(tensor).all():
            raise InvalidArgument(f"{name}: contains NaN or Inf")
        (a if which == "A" else b)[(layer, module)] = tensor.float().contiguous()
    if set(a) != set(b):
        unpaired = sorted(set(a) ^ set(b))
        raise InvalidArgument(f"lora_A/lora_B tensors are unpaired for {unpaired[:3]}")
    if not a:
        raise InvalidArgument("adapter_model.safetensors holds no LoRA tensors")
    modules = frozenset(module for _, module in a)
    assert modules <= set(LORA_MODULES)
    return LoraWeights(rank=rank, scaling=_scaling(config, rank), target_modules=modules, a=a, b=b,
                       sha256=hashlib.sha256(weights).hexdigest())


def load_adapter_folder(folder: str | Path, args: ModelArgs) -> LoraWeights:
    """A PEFT `save_pretrained` folder."""
    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise InvalidArgument(f"{folder} has no adapter_model.safetensors (pickled .bin is never loaded)")
    return parse_adapter((folder / "adapter_config.json").read_text(), weights.read_bytes(), args)
