"""Loads a Hugging Face checkpoint folder (safetensors, single or sharded) into our model.

Weights are read tensor by tensor straight onto the target device and dtype; a missing
weight or an unexpected one is an error (silently random weights would serve garbage).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from services.common.errors import InvalidArgument
from services.inference.model.config import ModelArgs, load_model_args
from services.inference.model.layers import RotaryEmbedding
from services.inference.model.llama import LlamaForCausalLM

# Buffers some exporters save that we recompute.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / shard for shard in shards]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise InvalidArgument(f"{folder} has no model.safetensors or model.safetensors.index.json "
                          "(only safetensors checkpoints are loaded)")


def load_model(folder: str | Path, dtype: torch.dtype = torch.float32,
               device: str | torch.device = "cpu") -> tuple[LlamaForCausalLM, ModelArgs]:
    folder = Path(folder)
    args = load_model_args(folder)
    with torch.device("meta"):
        model = LlamaForCausalLM(args)
    params = dict(model.named_parameters())
    loaded: dict[str, torch.Tensor] = {}
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device=str(device)) as reader:
            for name in reader.keys():
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in params:
                    raise InvalidArgument(f"{path.name}: unexpected weight {name!r} for {args.model_type}")
                tensor = reader.get_tensor(name)
                if tuple(tensor.shape) != tuple(params[name].shape):
                    raise InvalidArgument(f"{path.name}: {name} has shape {tuple(tensor.shape)}, "
                                          f"expected {tuple(params[name].shape)}")
                loaded[name] = tensor.to(dtype)
    if args.tie_word_embeddings:
        loaded.setdefault("lm_head.weight", loaded.get("model.embed_tokens.weight"))
    missing = sorted(name for name in params if loaded.get(name) is None)
    if missing:
        raise InvalidArgument(f"{folder}: checkpoint lacks {len(missing)} weights, e.g. {missing[:3]}")
    model.load_state_dict(loaded, assign=True, strict=False)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.model.rotary = RotaryEmbedding(args).to(device)  # buffers were built on "meta"
    return model.eval(), args


def random_model(folder: str | Path, dtype: torch.dtype, device: str | torch.device, seed: int = 0,
                 std: float = 0.02) -> tuple[LlamaForCausalLM, ModelArgs]:
    """Random weights of a checkpoint's shape, built on the device (benchmarks of big shapes
    such as Llama-3-8B without downloading or writing 16 GB)."""
    args = load_model_args(folder)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(args).to(dtype)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=generator)
    model.model.rotary = RotaryEmbedding(args).to(device)  # .to(dtype) cast inv_freq: keep it float32
    return model.eval(), args
