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

Host form: per module one [layers, R, in] tensor of A and one [layers, R, out] of B
transposed, the pool's own layout and dtype (pinned on CUDA), so putting an adapter into its
pages is one asynchronous copy per module and side rather than a synchronous one per layer, and
the host tier holds bf16 where a node serves bf16. The values are those the pool held when
every (layer, module) was converted on its way in: the scale fold is computed in float32 and
rounded once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor
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
    """One adapter in host memory, in host form (see the module docstring): per target module,
    A [layers, rank, in] and B transposed [layers, rank, out]; layers it leaves out are zeros."""

    rank: int  # the largest module rank; smaller modules are padded with zeros to it
    scaling: float  # lora_alpha / rank, or / sqrt(rank) with rsLoRA; each module's own scale is folded into b
    target_modules: frozenset[str]
    a: dict[str, torch.Tensor]
    b: dict[str, torch.Tensor]
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
    name: str  # as the file names it
    layer: int
    module: str  # q_proj, ...
    side: str  # "A" or "B"
    module_name: str  # the module's name in the base model, as peft's patterns see it
    tensor: torch.Tensor


def parse_adapter(config: dict | str, weights: bytes, args: ModelArgs, dtype: torch.dtype = torch.float32,
                  pin_memory: bool = False, sha256: str = "") -> LoraWeights:
    """Builds LoraWeights in host form (`dtype`: the pool's; `pin_memory` where the pool is on
    CUDA) from the two files' contents; InvalidArgument on any mismatch. `sha256`: the digest
    of `weights` where the caller computed it already (hashed here otherwise)."""
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
    # hashlib lets go of the GIL on large buffers: the digest is computed while the tensors are packed.
    with ThreadPoolExecutor(max_workers=1) as hasher:
        hashing = None if sha256 else hasher.submit(hashlib.sha256, weights)
        pairs = _checked_pairs(_read_tensors(weights, args), patterns, args)
        pool_rank = max(pair.lora.rank for pair in pairs.values())
        scaling = lora_scaling(patterns.alpha, pool_rank, use_rslora)
        a, b = _host_form(pairs, args, pool_rank, scaling, use_rslora, dtype, pin_memory)
        sha256 = sha256 or hashing.result().hexdigest()
    config_text = json.dumps(config, separators=(",", ":"), ensure_ascii=False)  # key order kept: patterns need it
    fingerprint = hashlib.sha256(f"{sha256}\n{config_text}".encode()).hexdigest()
    return LoraWeights(rank=pool_rank, scaling=scaling, target_modules=frozenset(a), a=a, b=b, sha256=sha256,
                       fingerprint=fingerprint)


class _Pair(NamedTuple):
    """One (layer, module)'s two tensors as the file holds them, and its resolved rank and alpha."""
    lora: ModuleLora
    a: _LoraTensor
    b: _LoraTensor


def _checked_pairs(tensors: dict[str, _LoraTensor], patterns: LoraPatterns,
                   args: ModelArgs) -> dict[tuple[int, str], _Pair]:
    """(layer, module) -> its A and B, each shape checked against the base model and the patterns."""
    modules = patterns.resolve(dict.fromkeys(t.module_name for t in tensors.values()))
    shapes = args.module_shapes()
    sides: dict[str, dict[tuple[int, str], _LoraTensor]] = {"A": {}, "B": {}}
    for name, t in sorted(tensors.items()):  # name order: deterministic messages
        lora = modules[t.module_name]
        in_features, out_features = shapes[t.module]
        expected = (lora.rank, in_features) if t.side == "A" else (out_features, lora.rank)
        if tuple(t.tensor.shape) != expected:
            source = f" (r from rank_pattern key {lora.rank_key!r})" if lora.rank_key is not None else ""
            raise InvalidArgument(f"{name}: shape {tuple(t.tensor.shape)}, expected {expected}{source}")
        sides[t.side][(t.layer, t.module)] = t
    if set(sides["A"]) != set(sides["B"]):
        unpaired = sorted(set(sides["A"]) ^ set(sides["B"]))
        raise InvalidArgument(f"lora_A/lora_B tensors are unpaired for {unpaired[:3]}")
    if not sides["A"]:
        raise InvalidArgument("adapter_model.safetensors holds no LoRA tensors")
    assert {module for _, module in sides["A"]} <= set(LORA_MODULES)
    return {where: _Pair(modules[a.module_name], a, sides["B"][where]) for where, a in sides["A"].items()}


def _read_tensors(weights: bytes, args: ModelArgs) -> dict[str, _LoraTensor]:
    tensors = {}
    for name, tensor in load_safetensors(weights).items():
        match = _KEY.match(name)
        if match is None:
            raise InvalidArgument(f"adapter_model.safetensors: unsupported tensor {name!r}")
        layer, parent, module, side = int(match.group(1)), match.group(2), match.group(3), match.group(4)
        if layer >= args.num_layers:
            raise InvalidArgument(f"{name}: layer {layer} does not exist (base has {args.num_layers})")
        tensors[name] = _LoraTensor(name, layer, module, side, f"model.layers.{layer}.{parent}.{module}", tensor)
    return tensors


def _host_form(pairs: dict[tuple[int, str], _Pair], args: ModelArgs, pool_rank: int, scaling: float,
               use_rslora: bool, dtype: torch.dtype, pin_memory: bool) -> tuple[dict, dict]:
    """Per module: A [layers, R, in] and B transposed [layers, R, out] in `dtype`, each module's
    A [r_m, in] and B [out, r_m] padded with zeros to R and its scale relative to the adapter's
    folded into B (see the module docstring); layers a module leaves out are zeros."""
    shapes = args.module_shapes()
    a: dict[str, torch.Tensor] = {}
    b: dict[str, torch.Tensor] = {}
    for module in sorted({module for _, module in pairs}):
        in_features, out_features = shapes[module]
        # zeros, not empty: padding rows and absent layers must add exactly nothing.
        a[module] = torch.zeros(args.num_layers, pool_rank, in_features, dtype=dtype, pin_memory=pin_memory)
        b[module] = torch.zeros(args.num_layers, pool_rank, out_features, dtype=dtype, pin_memory=pin_memory)
    for (layer, module), pair in pairs.items():
        rank = pair.lora.rank
        ratio = lora_scaling(pair.lora.alpha, rank, use_rslora) / scaling
        a[module][layer, :rank].copy_(pair.a.tensor)
        # In float32, rounded once into dtype; a module at the adapter's own scale keeps its exact bits.
        b[module][layer, :rank].copy_(pair.b.tensor.T if ratio == 1.0 else pair.b.tensor.T.float() * ratio)
    for module in a:
        for side, packed in (("A", a[module]), ("B", b[module])):
            low, high = torch.aminmax(packed)  # NaN and +-Inf reach one end or the other
            if not (math.isfinite(low) and math.isfinite(high)):
                raise InvalidArgument(_not_finite(pairs, module, side, packed, dtype))
    return a, b


def _not_finite(pairs: dict[tuple[int, str], _Pair], module: str, side: str, packed: torch.Tensor,
                dtype: torch.dtype) -> str:
    """Which tensor made `packed` hold NaN or Inf, and how (the slow path: only for a refusal)."""
    for (layer, pair_module), pair in sorted(pairs.items()):
        source = pair.a if side == "A" else pair.b
        if pair_module != module or torch.isfinite(packed[layer]).all():
            continue
        if not torch.isfinite(source.tensor).all():
            return f"{source.name}: contains NaN or Inf"
        return f"{source.name}: values beyond the range of {dtype}, the dtype this node serves adapters in"
    raise AssertionError(f"{module} {side}: a non-finite value in no layer")


def load_adapter_folder(folder: str | Path, args: ModelArgs) -> LoraWeights:
    """A PEFT `save_pretrained` folder."""
    folder = Path(folder)
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        raise InvalidArgument(f"{folder} has no adapter_model.safetensors (pickled .bin is never loaded)")
    return parse_adapter((folder / "adapter_config.json").read_text(), weights.read_bytes(), args)
