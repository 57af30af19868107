"""LoraBatch: which adapter each token of a step uses, computed once per step.

The model runner orders scheduled sequences so that tokens sharing an adapter are
contiguous; each run of tokens is one Segment. Layers call `apply`, the one seam between
the base layers and LoRA compute (a GPU backend replaces `lora_segments` here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.inference.kernels.reference import Segment, lora_segments


@dataclass
class AdapterSegments:
    """Segments of one adapter and the modules it targets (others contribute nothing)."""

    segments: list[Segment]
    modules: frozenset[str]


@dataclass
class LoraBatch:
    groups: list[AdapterSegments]
    a_pages: dict[str, torch.Tensor]  # module -> [L, P, in] pool buffer
    b_pages: dict[str, torch.Tensor]  # module -> [L, P, out] pool buffer
    by_module: dict[str, list[Segment]] = field(init=False)

    def __post_init__(self) -> None:
        self.by_module = {module: [s for g in self.groups if module in g.modules for s in g.segments]
                          for module in self.a_pages}

    def apply(self, y: torch.Tensor, x: torch.Tensor, layer: int, module: str) -> torch.Tensor:
        """y [T, out] += LoRA(x [T, in]) for every token whose adapter targets `module`."""
        segments = self.by_module.get(module)
        if not segments:
            return y
        return lora_segments(y, x, self.a_pages[module][layer], self.b_pages[module][layer], segments)
