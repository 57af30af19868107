"""Which kernels a node runs: plain PyTorch (kernels/reference.py, grouped.py, the model's
attention) or Triton (triton_lora.py, triton_attention.py, triton_prefill_attention.py).

`auto` takes Triton on CUDA (AUTO_TRITON_ON_CUDA) and PyTorch elsewhere: on the H200
(bench/device_check.py, 2026-12-04) every Triton kernel test passed compiled, the oracle
tests matched HF + peft token for token with Triton kernels and captured decode graphs, and
the kernels beat the PyTorch paths 3-70x (bench/gpu_notes.md, v2). Triton on a CPU device only
works under TRITON_INTERPRET=1 (the interpreter: slow, for tests), so asking for it there
without the interpreter is a configuration error, said at start-up.
"""

from __future__ import annotations

import importlib
import os

import torch

TORCH, TRITON = "torch", "triton"
CHOICES = ("auto", TORCH, TRITON)
AUTO_TRITON_ON_CUDA = True  # verified on the H200 against HF + peft (issue #8)


def triton_available() -> bool:
    """True when triton can be imported (GPU compile, or the CPU interpreter)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def resolve_kernels(requested: str, device: str | torch.device) -> str:
    """`torch` or `triton` for `requested` in CHOICES on `device`; ValueError when impossible."""
    if requested not in CHOICES:
        raise ValueError(f"--kernels must be one of {', '.join(CHOICES)}, got {requested!r}")
    on_cuda = torch.device(device).type == "cuda"
    if requested == "auto":
        return TRITON if AUTO_TRITON_ON_CUDA and on_cuda and triton_available() else TORCH
    if requested == TRITON:
        if not triton_available():
            raise ValueError("--kernels triton needs the triton package (pip install triton)")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError("--kernels triton on a CPU device runs only under TRITON_INTERPRET=1 "
                             "(triton's interpreter, for tests); use --kernels torch on CPU")
    return requested
