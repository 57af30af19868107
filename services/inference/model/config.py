"""ModelArgs: what our Llama-family implementation needs from a checkpoint's config.json.

transformers parses the config (it knows every field's legacy spelling and normalizes rope
parameters); we copy out the few numbers the serving forward uses, and refuse what we do
not implement (sliding windows, unknown rope types) instead of serving wrong tokens.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from transformers import AutoConfig

from services.common.errors import InvalidArgument

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True)
class ModelArgs:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_type: str = "default"
    rope_scaling: tuple[tuple[str, float], ...] = ()  # factor, low/high_freq_factor, original max
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable projection."""
        q_out, kv_out = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden_size, q_out),
            "k_proj": (self.hidden_size, kv_out),
            "v_proj": (self.hidden_size, kv_out),
            "o_proj": (q_out, self.hidden_size),
            "gate_proj": (self.hidden_size, self.intermediate_size),
            "up_proj": (self.hidden_size, self.intermediate_size),
            "down_proj": (self.intermediate_size, self.hidden_size),
        }

    @property
    def rope_params(self) -> dict[str, float]:
        return dict(self.rope_scaling)


def _eos_ids(folder: Path, config) -> tuple[int, ...]:
    """Union of eos ids from config.json and generation_config.json (chat models stop on
    end-of-turn tokens that only generation_config lists)."""
    ids: set[int] = set()
    sources = [getattr(config, "eos_token_id", None)]
    generation = folder / "generation_config.json"
    if generation.is_file():
        sources.append(json.loads(generation.read_text()).get("eos_token_id"))
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return tuple(sorted(ids))


def load_model_args(folder: str | Path) -> ModelArgs:
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise InvalidArgument(f"{folder} is not a checkpoint folder: config.json is missing")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    model_type = config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidArgument(f"model_type {model_type!r} is not supported; supported: {SUPPORTED_MODEL_TYPES}")
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])) or (
        model_type == "mistral" and getattr(config, "sliding_window", None)
    ):
        raise InvalidArgument("sliding-window attention is not supported yet")
    rope = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = rope.pop("rope_type", "default") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise InvalidArgument(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
    rope_theta = float(rope.pop("rope_theta", getattr(config, "rope_theta", 10000.0)))
    heads = config.num_attention_heads
    attention_bias = bool(getattr(config, "attention_bias", False))
    return ModelArgs(
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        rms_norm_eps=config.rms_norm_eps,
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=rope_theta,
        rope_type=rope_type,
        rope_scaling=tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, (int, float)))),
        tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=attention_bias and model_type != "qwen2",
        mlp_bias=bool(getattr(config, "mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        eos_token_ids=_eos_ids(folder, config),
    )
