"""Adapter upload validation: everything is checked before anything is stored.

`UploadReceiver` (archive.py) takes the body as it arrives and unpacks it; `validate_upload`
checks the config (lora_config.py) and the weights (tensors.py) against the base model's
fingerprint and returns what the registry records. Every refusal is InvalidArgument naming the file or
tensor and the expected vs actual value. No function here touches the database or the
blob store.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

from services.common.lora_patterns import lora_scaling
from services.registry.fingerprint import ArchitectureFingerprint
from services.registry.validation.archive import (CONFIG_FILE, WEIGHTS_FILE, AdapterFiles, UploadLimits,
                                                  UploadReceiver, check_files_header)
from services.registry.validation.lora_config import LoraSpec, check_base_model_reference, parse_lora_config
from services.registry.validation.tensors import check_finite, check_tensors, read_header

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "AdapterFiles", "BaseModelRef", "UploadLimits", "UploadReceiver",
           "ValidatedAdapter", "check_files_header", "validate_upload"]


@dataclasses.dataclass(frozen=True)
class ValidatedAdapter:
    spec: LoraSpec
    target_modules: list[str]
    #: The largest module rank (rank_pattern can make modules differ): pages the adapter takes in a node's pool.
    rank: int
    #: The one scale a node applies with that rank: lora_alpha / rank (rsLoRA: / sqrt(rank)). Nodes fold each
    #: module's own alpha / r into its B (services/inference/adapters/weights.py).
    scaling: float
    weights_path: Path
    size_bytes: int
    sha256: str
    #: Identity of an upload for idempotency: weights and normalized config together.
    content_digest: str


@dataclasses.dataclass(frozen=True)
class BaseModelRef:
    name: str
    location: str
    fingerprint: ArchitectureFingerprint


def validate_upload(unpacked: AdapterFiles, base: BaseModelRef, limits: UploadLimits,
                    override_base_model_check: bool) -> ValidatedAdapter:
    """Checks unpacked adapter files (see UploadReceiver.unpack) against the base model."""
    spec = parse_lora_config(unpacked.config_bytes, limits.max_rank)
    check_base_model_reference(spec, base.name, base.location, override_base_model_check)
    entries = read_header(unpacked.weights_path, unpacked.weights_size)
    checked = check_tensors(entries, base.fingerprint, spec)
    check_finite(unpacked.weights_path, entries)
    content = hashlib.sha256(f"{unpacked.weights_sha256}\n{spec.normalized_json}".encode()).hexdigest()
    return ValidatedAdapter(spec, checked.target_modules, checked.rank,
                            lora_scaling(spec.alpha, checked.rank, spec.use_rslora), unpacked.weights_path,
                            unpacked.weights_size, unpacked.weights_sha256, content)
