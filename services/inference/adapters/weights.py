"""Parse a PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors) into
per-(layer, module) A/B matrices checked against the base model's shapes, in pool form.

Only safetensors are read (never pickle). The Registry validates uploads first; the node
re-checks because it must never write a wrong-shaped tensor into its shared page pool.

Pool form: the pool gives an adapter one rank R and one scale (DESIGN.md §3), but
rank_pattern / alpha_pattern give each module its own r_m and alpha_m (resolved as peft does,
services/common/lora_patterns.py). So every module is padded to the adapter's largest rank R
(zero rows in A, zero columns in B: the extra pages add exactly nothing), and its own scale
s_m relative to the adapter's s = lora_alpha / R is folded into B:
`s * (B_m * s_m / s) @ A_m == s_m * B_m @ A_m`, peft's per-module result.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import load as load_safetensors

from services.common.errors import InvalidArgument
from services.common.lora_patterns import LoraPatterns, ModuleLora, lora_scaling
from services.inference.model.config import LORA_MODULES, ModelArgs

_KEY = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(self_attn|mlp)\."
                  r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_(A|B)(?:\.default)?\.weight$")


@dataclass
class LoraWeights:
    """One adapter in host memory, in pool form: A [rank, in] and B [out, rank] per (layer, module)."""

    rank: int  # the largest module rank; smaller modules are padded with zeros to it
    scaling: float  # lora_alpha / rank, or / sqrt(rank) with rsLoRA; each module's own scale is folded into b
    target_modules: frozenset[str]
    a: dict[tuple[int, str], torch.Tensor]
    b: dict[tuple[int, str], torch.Tensor]
    sha256: str  # of adapter_model.safetensors: what requests and the Registry name the bytes by
    #: sha256 and the config together: what the pool form depends on. The same weights under
    #: another config (a local adapter folder whose adapter_config.json was edited: alpha, rsLoRA,
    #: patterns) compute something else, so the pool must not keep the old copy for them, nor
    #: the prefix cache share their KV.
    fingerprint: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.a.values(), *self.b.values()))


#: What a config without `lora_alpha` means: PEFT's LoraConfig default, as the Registry reads it.
PEFT_DEFAULT_ALPHA = 8


class _LoraTensor(NamedTuple):
    layer: int
    module: str  # q_proj, ...
    side: str  # "A" or "B"
    module_name: str  # the module's name in the base model, as peft's patterns see it
    tensor: torch.Tensor


def parse_adapter(config: dict | str, weights: bytes, args: ModelArgs) -> LoraWeights:
    """Builds LoraWeights from the two files' contents; InvalidArgument on any mismatch."""
    config = json.loads(config) if isinstance(config, str) else config
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidArgument(f"peft_type must be LORA, got {config.get('peft_type')!r}")
    if config.get("use_dora"):
        raise InvalidArgument("DoRA adapters are not supported")
    rank = int(config.get("r", 0))
    if rank < 1:
        raise InvalidArgument(f"adapter rank r must be >= 1, got {rank}")
    use_rslora = bool(config.get("use_rslora"))
    # No rank limit here: the node's applies to the padded rank (AdapterManager).
    patterns = LoraPatterns.from_config(config, rank, float(config.get("lora_alpha", PEFT_DEFAULT_ALPHA)))
    tensors = _read_tensors(weights, args)
    modules = patterns.resolve(dict.fromkeys(t.module_name for t in tensors.values()))
    shapes = args.module_shapes()
    a: dict[tuple[int, str], torch.Tensor] = {}
    b: dict[tuple[int, str], torch.Tensor] = {}
    resolved: dict[tuple[int, str], ModuleLora] = {}
    for name, t in sorted(tensors.items()):  # name order: deterministic messages
        lora = modules[t.module_name]
        in_features, out_features = shapes[t.module]
        expected = (lora.rank, in_features) if t.side == "A" else (out_features, lora.rank)
        if tuple(t.tensor.shape) != expected:
            source = f" (r from rank_pattern key {lora.rank_key!r})" if lora.rank_key is not None else ""
            raise InvalidArgument(f"{name}: shape {tuple(t.tensor.shape)}, expected {expected}{source}")
        if not torch.isfinite(t.tensor).all():
            raise InvalidArgument(f"{name}: contains NaN or Inf")
        (a if t.side == "A" else b)[(t.layer, t.module)] = t.tensor.float()
        resolved[(t.layer, t.module)] = lora
    if set(a) != set(b):
        unpaired = sorted(set(a) ^ set(b))
        raise InvalidArgument(f"lora_A/lora_B tensors are unpaired for {unpaired[:3]}")
    if not a:
        raise InvalidArgument("adapter_model.safetensors holds no LoRA tensors")
    target_modules = frozenset(module for _, module in a)
    assert target_modules <= set(LORA_MODULES)
    pool_rank = max(lora.rank for lora in resolved.values())
    scaling = lora_scaling(patterns.alpha, pool_rank, use_rslora)
    for where, lora in resolved.items():
        a[where], b[where] = _pool_form(a[where], b[where], lora, pool_rank, scaling, use_rslora)
    sha256 = hashlib.sha256(weights).hexdigest()
    config_text = json.dumps(config, separators=(",", ":"), ensure_ascii=False)  # key order kept: patterns need it
    fingerprint = hashlib.sha256(f"{sha256}\n{config_text}".encode()).hexdigest()
    return LoraWeights(rank=pool_rank, scaling=scaling, target_modules=target_modules, a=a, b=b, sha256=sha256,
                       fingerprint=fingerprint)


def _read_tensors(weights: bytes, args: ModelArgs) -> dict[str, _LoraTensor]:
    tensors = {}
    for name, tensor in load_safetensors(weights).items():
        match = _KEY.match(name)
        if match is None:
            raise InvalidArgument(f"adapter_model.safetensors: unsupported tensor {name!r}")
        layer, parent, module, side = int(match.group(1)), match.group(2), match.group(3), match.group(4)
        if layer >= args.num_layers:
            raise InvalidArgument(f"{name}: layer {layer} does not exist (base has {args.num_layers})")
        tensors[name] = _LoraTensor(layer, module, side, f"model.layers.{layer}.{parent}.{module}", tensor)
    return tensors


def _pool_form(a: torch.Tensor, b: torch.Tensor, lora: ModuleLora, pool_rank: int, scaling: float,
               use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A [r_m, in] -> [R, in] and B [out, r_m] -> [out, R], with the module's scale relative to the
    adapter's folded into B (see the module docstring)."""
    ratio = lora_scaling(lora.alpha, lora.rank, use_rslora) / scaling
    if ratio != 1.0:  # a module at the adapter's own scale keeps its exact bits
        b = b * ratio
    pad = pool_rank - lora.rank
    if pad:
        a = torch.cat([a, a.new_zeros(pad, a.shape[1])])
        b = torch.cat([b, b.new_zeros(b.shape[0], pad)], dim=1)
    return a.contiguous(), b.contiguous()


def load_adapter_folder(folder: str | Path, args: ModelArgs) -> LoraWeights:
    """A PEFT `save_pretrained` folder."""
    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise InvalidArgument(f"{folder} has no adapter_model.safetensors (pickled .bin is never loaded)")
    return parse_adapter((folder / "adapter_config.json").read_text(), weights.read_bytes(), args)
