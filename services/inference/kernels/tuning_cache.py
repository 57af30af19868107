"""Start-up measurements kept on disk (--tuning-cache-dir), so a node started again on the same
GPU with the same software and shapes does not time its launches again.

Why: measuring a Llama-3-8B node's decode LoRA launches takes tens of seconds of start-up, every
start, for an answer that only changes with the GPU, the kernels or the library versions. An
entry is keyed by all of those: the GPU's name and compute capability, the torch and triton
versions, a digest of the kernel and tuning sources (a changed kernel voids what was measured
for the old one) and what was measured (shapes, dtype, modes). A missing, unreadable or stale
entry is measured again and rewritten; entries are written whole or not at all (a temporary
file, then a rename), so a node killed while writing leaves nothing half-written behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

_KERNELS = Path(__file__).resolve().parent
# What the measured choices depend on besides the GPU and library versions.
SOURCES = [_KERNELS / name for name in ("triton_lora_kernels.py", "triton_lora.py", "decode_lora_tuning.py",
                                        "streams.py", "graph_timing.py")]


def environment(device: torch.device | str) -> dict:
    """What a measurement on `device` depends on, beyond its own inputs."""
    device = torch.device(device)
    if device.type == "cuda":
        gpu, capability = torch.cuda.get_device_name(device), list(torch.cuda.get_device_capability(device))
    else:
        gpu, capability = device.type, []
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    return {"gpu": gpu, "capability": capability, "torch": torch.__version__, "triton": triton_version,
            "sources": digest.hexdigest()[:16]}


def entry_path(folder: Path, what: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(folder) / f"{what}-{digest}.json"


def load(path: Path, key: dict) -> dict | None:
    """The value stored under `key` at path, or None (missing, unreadable, or another key's)."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry.get("value") if isinstance(entry, dict) and entry.get("key") == key else None


def store(path: Path, key: dict, value: dict) -> None:
    """Writes the entry whole or not at all: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as out:
            json.dump({"key": key, "value": value}, out, sort_keys=True)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
