"""Small host lists on the device without waiting for the device's queue."""

from __future__ import annotations

import torch


def to_device_async(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` as a tensor on `device`, queued like a kernel. Why not torch.tensor(values,
    device=cuda): a copy from pageable memory to a GPU waits for every kernel queued before it,
    so with decode steps overlapped (engine/overlap.py) the host would sit out the next step's
    forward; a copy from pinned memory does not wait (PyTorch keeps the pinned buffer alive
    until the copy is done)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)
