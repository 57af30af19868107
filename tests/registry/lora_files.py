"""Adapter files for tests: real PEFT adapters on the tiny model, and hostile variants.

Weights are handled as numpy arrays through safetensors.numpy (no torch needed to mutate
them); only `make_peft_adapter` uses torch + peft, to produce what real users upload.
"""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

ALL_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PREFIX = "base_model.model.model.layers"


@dataclasses.dataclass(frozen=True)
class AdapterFiles:
    config: bytes
    weights: bytes

    @property
    def config_dict(self) -> dict:
        return json.loads(self.config)

    @property
    def tensors(self) -> dict[str, np.ndarray]:
        return load_tensors(self.weights)

    def with_config(self, **changes) -> AdapterFiles:
        config = self.config_dict
        for key, value in changes.items():
            if value is _DROP:
                config.pop(key, None)
            else:
                config[key] = value
        return AdapterFiles(json.dumps(config).encode(), self.weights)

    def with_tensors(self, tensors: dict[str, np.ndarray]) -> AdapterFiles:
        return AdapterFiles(self.config, save_tensors(tensors))

    def mutate(self, fn) -> AdapterFiles:
        tensors = {name: array.copy() for name, array in self.tensors.items()}
        fn(tensors)
        return self.with_tensors(tensors)

    def zip(self, extra: dict[str, bytes] | None = None, folder: str = "") -> bytes:
        return make_zip({f"{folder}adapter_config.json": self.config,
                         f"{folder}adapter_model.safetensors": self.weights, **(extra or {})})


_DROP = object()
DROP = _DROP


def make_zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_with_symlink(files: AdapterFiles, link_name: str = "adapter_model.safetensors") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("adapter_config.json", files.config)
        info = zipfile.ZipInfo(link_name)
        info.create_system = 3  # unix, so external_attr carries the mode
        info.external_attr = (0o120777 << 16)
        archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def make_peft_adapter(base_dir: Path, out_dir: Path, *, r: int = 4, alpha: float = 8, seed: int = 0,
                      modules: list[str] | None = None, use_rslora: bool = False, rank_pattern: dict | None = None,
                      alpha_pattern: dict | None = None) -> AdapterFiles:
    """A real PEFT LoRA adapter for the tiny model, with random (non-zero) A and B; rank_pattern and
    alpha_pattern give modules their own ranks and alphas."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules or ALL_MODULES, task_type="CAUSAL_LM",
                        use_rslora=use_rslora, init_lora_weights=False, rank_pattern=rank_pattern or {},
                        alpha_pattern=alpha_pattern or {})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft calls a deprecated transformers helper
        get_peft_model(model, config).save_pretrained(out_dir)
    return AdapterFiles((out_dir / "adapter_config.json").read_bytes(),
                        (out_dir / "adapter_model.safetensors").read_bytes())


def variant(files: AdapterFiles, seed: int) -> AdapterFiles:
    """Same shapes, different weights: a distinct upload."""
    rng = np.random.default_rng(seed)
    return files.mutate(lambda t: t.update({k: rng.standard_normal(t[k].shape).astype(t[k].dtype) for k in sorted(t)}))


def raw_safetensors(header: dict, data: bytes) -> bytes:
    """A safetensors file with an arbitrary (possibly lying) header."""
    encoded = json.dumps(header).encode()
    return struct.pack("<Q", len(encoded)) + encoded + data


def key(layer: int, module: str, side: str) -> str:
    parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    return f"{PREFIX}.{layer}.{parent}.{module}.lora_{side}.weight"


def to_bf16(files: AdapterFiles) -> AdapterFiles:
    """The same adapter in bfloat16 (numpy has no bf16: keep the top 16 bits of each float32)."""
    header, chunks, offset = {}, [], 0
    for name, array in sorted(files.tensors.items()):
        raw = (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    return AdapterFiles(files.config, raw_safetensors(header, b"".join(chunks)))
