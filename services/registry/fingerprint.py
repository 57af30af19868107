"""Architecture fingerprint of a base model, read from its config.json.

An adapter fits a base model when every LoRA tensor's shape matches the in/out features of
the module it targets, in a layer that exists. Those features follow from a few config
fields, so the fingerprint records them plus the derived per-module shapes:

    q_proj: hidden -> heads * head_dim          o_proj: heads * head_dim -> hidden
    k_proj, v_proj: hidden -> kv_heads * head_dim
    gate_proj, up_proj: hidden -> intermediate  down_proj: intermediate -> hidden

`digest` is the sha256 of the canonical JSON of every other field: two checkpoints with
equal digests accept the same adapters. Only the Llama family is served (DESIGN.md §3).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from services.common.errors import InvalidArgument

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
MODULES = ATTENTION_MODULES + MLP_MODULES
#: ArchitectureFingerprint and ModuleShape fields are uint32 on the wire. A larger value
#: would be stored, then fail every later GetBaseModel, ListBaseModels and ResolveDeployment
#: as it is converted: refused at registration instead.
MAX_FIELD = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class ModuleShape:
    module: str
    in_features: int
    out_features: int


@dataclasses.dataclass(frozen=True)
class ArchitectureFingerprint:
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    modules: tuple[ModuleShape, ...]
    digest: str = ""

    def module(self, name: str) -> ModuleShape:
        for shape in self.modules:
            if shape.module == name:
                return shape
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchitectureFingerprint:
        modules = tuple(ModuleShape(**m) for m in data["modules"])
        return cls(**{**data, "modules": modules})


def _positive_int(config: dict[str, Any], key: str, default: Any = None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FIELD:
        raise InvalidArgument(f"config.json field {key!r} must be a positive integer of at most {MAX_FIELD}, got "
                              f"{value!r:.60}", reason="BAD_BASE_MODEL_CONFIG", field=key, actual=f"{value!r:.60}")
    return value


def _digest(fields: dict[str, Any]) -> str:
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def fingerprint_from_config(config: dict[str, Any]) -> ArchitectureFingerprint:
    """The fingerprint of a Hugging Face config.json (already parsed); INVALID_ARGUMENT if unusable."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(f"config.json model_type {model_type!r} is not supported; expected one of "
                              f"{', '.join(SUPPORTED_MODEL_TYPES)}", reason="UNSUPPORTED_MODEL_TYPE",
                              field="model_type", expected="|".join(SUPPORTED_MODEL_TYPES), actual=model_type)
    hidden = _positive_int(config, "hidden_size")
    heads = _positive_int(config, "num_attention_heads")
    kv_heads = _positive_int(config, "num_key_value_heads", heads)
    if config.get("head_dim") is None and hidden % heads:
        raise InvalidArgument(f"config.json hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                              "and there is no head_dim", reason="BAD_BASE_MODEL_CONFIG", field="head_dim")
    head_dim = _positive_int(config, "head_dim", hidden // heads)
    intermediate = _positive_int(config, "intermediate_size")
    modules = (
        ModuleShape("q_proj", hidden, heads * head_dim),
        ModuleShape("k_proj", hidden, kv_heads * head_dim),
        ModuleShape("v_proj", hidden, kv_heads * head_dim),
        ModuleShape("o_proj", heads * head_dim, hidden),
        ModuleShape("gate_proj", hidden, intermediate),
        ModuleShape("up_proj", hidden, intermediate),
        ModuleShape("down_proj", intermediate, hidden),
    )
    for shape in modules:
        if max(shape.in_features, shape.out_features) > MAX_FIELD:
            raise InvalidArgument(f"config.json gives {shape.module} {shape.in_features} -> {shape.out_features} "
                                  f"features; at most {MAX_FIELD} are supported", reason="BAD_BASE_MODEL_CONFIG",
                                  field="head_dim", expected=f"<= {MAX_FIELD}",
                                  actual=max(shape.in_features, shape.out_features))
    fingerprint = ArchitectureFingerprint(
        model_type=model_type,
        num_layers=_positive_int(config, "num_hidden_layers"),
        hidden_size=hidden,
        vocab_size=_positive_int(config, "vocab_size"),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        max_position_embeddings=_positive_int(config, "max_position_embeddings"),
        modules=modules,
    )
    fields = fingerprint.to_dict()
    del fields["digest"]
    return dataclasses.replace(fingerprint, digest=_digest(fields))
