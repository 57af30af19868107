"""Checkpoints of a running job: adapter weights, optimizer, LR schedule and RNG state.

A checkpoint is the folder `step-NNNNNNNN` (the number of optimizer steps done). It is written
as `step-NNNNNNNN.partial` and renamed when complete, so a crash mid-write leaves no folder
that looks finished; `latest` ignores (and removes) partial ones. Adapter weights are
safetensors; optimizer/scheduler/RNG state are torch files we wrote ourselves, loaded back with
`weights_only=True` (no arbitrary unpickling even of our own files).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

_PREFIX, _PARTIAL = "step-", ".partial"
WEIGHTS, OPTIMIZER, SCHEDULER, RNG, STATE = ("adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt",
                                             "state.json")


def _name(step: int) -> str:
    return f"{_PREFIX}{step:08d}"


def save(directory: Path, step: int, model, optimizer, scheduler, keep: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    final, partial = directory / _name(step), directory / (_name(step) + _PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    weights = {key: value.detach().to("cpu").contiguous() for key, value in get_peft_model_state_dict(model).items()}
    save_file(weights, partial / WEIGHTS)
    torch.save(optimizer.state_dict(), partial / OPTIMIZER)
    torch.save(scheduler.state_dict(), partial / SCHEDULER)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, partial / RNG)
    (partial / STATE).write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    for old in complete(directory)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete(directory: Path) -> list[Path]:
    """Finished checkpoints, oldest first; partial leftovers are removed."""
    if not directory.is_dir():
        return []
    found = []
    for entry in directory.iterdir():
        if entry.name.endswith(_PARTIAL):
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(_PREFIX) and (entry / STATE).is_file():
            found.append(entry)
    return sorted(found, key=lambda path: path.name)


def restore(path: Path, model, optimizer, scheduler, device: torch.device) -> int:
    """Loads a checkpoint into the live objects; returns its step."""
    set_peft_model_state_dict(model, load_file(path / WEIGHTS, device=str(device)))
    optimizer.load_state_dict(torch.load(path / OPTIMIZER, map_location=device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / SCHEDULER, weights_only=True))
    rng = torch.load(path / RNG, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(json.loads((path / STATE).read_text())["step"])
