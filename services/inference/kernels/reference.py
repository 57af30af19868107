"""Plain-PyTorch batched LoRA over the paged adapter pool: the CPU path and the oracle.

Pool layout (DESIGN.md §3): for one (layer, projection), `a_pages[P, in]` and
`b_pages[P, out]`; an adapter of rank r owns r page ids p[0..r), the same ids in every
layer and projection. Every fast kernel (Triton, grouped GEMM) must match these functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Segment:
    """Consecutive tokens [start, end) of a packed batch that share one adapter."""

    start: int
    end: int
    pages: torch.Tensor  # [r] int64 page ids of the adapter
    scale: float
    # The same ids on the host, when the caller has them: planning reads them instead of
    # pages.tolist(), which on a GPU would wait for the device every step.
    host_pages: tuple[int, ...] = ()

    def page_ids(self) -> tuple[int, ...]:
        return self.host_pages or tuple(int(p) for p in self.pages.reshape(-1).tolist())


def lora_segments(y: torch.Tensor, x: torch.Tensor, a_pages: torch.Tensor, b_pages: torch.Tensor,
                  segments: Sequence[Segment]) -> torch.Tensor:
    """Semantics: y[s:e] += scale * (x[s:e] @ a_pages[p].T) @ b_pages[p]   for each segment.

    y: [T, out] (updated in place and returned), x: [T, in], a_pages: [P, in],
    b_pages: [P, out]. Tokens outside every segment are left alone (base model only).
    """
    for segment in segments:
        if segment.end <= segment.start:
            continue
        shrunk = x[segment.start:segment.end] @ a_pages[segment.pages].T  # [n, r]
        y[segment.start:segment.end] += segment.scale * (shrunk @ b_pages[segment.pages])  # [n, out]
    return y


def lora_tokens(y: torch.Tensor, x: torch.Tensor, a_pages: torch.Tensor, b_pages: torch.Tensor,
                token_pages: torch.Tensor, token_scales: torch.Tensor) -> torch.Tensor:
    """Semantics: s[t, j] = x[t] · a_pages[p[t, j]];  y[t] += scale[t] * Σ_j s[t, j] * b_pages[p[t, j]].

    The per-token form decode kernels use. token_pages: [T, R] int64 with -1 for "no page"
    (ranks differ; base-only rows are all -1), token_scales: [T]. y: [T, out] in place.
    """
    valid = token_pages >= 0  # [T, R]
    safe = token_pages.clamp(min=0)
    a = a_pages[safe] * valid[..., None]  # [T, R, in]
    b = b_pages[safe] * valid[..., None]  # [T, R, out]
    shrunk = torch.einsum("ti,tri->tr", x, a)  # [T, R]
    y += token_scales[:, None].to(y.dtype) * torch.einsum("tr,tro->to", shrunk, b)
    return y


def segments_to_tokens(segments: Sequence[Segment], num_tokens: int,
                       device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token layout (token_pages [T, R], token_scales [T]) of a segment list."""
    max_rank = max((len(s.pages) for s in segments), default=0)
    token_pages = torch.full((num_tokens, max(max_rank, 1)), -1, dtype=torch.int64, device=device)
    token_scales = torch.zeros(num_tokens, dtype=torch.float32, device=device)
    for segment in segments:
        token_pages[segment.start:segment.end, :len(segment.pages)] = segment.pages.to(device)
        token_scales[segment.start:segment.end] = segment.scale
    return token_pages, token_scales


def lora_gathered(y: torch.Tensor, x: torch.Tensor, a_pages: torch.Tensor, b_pages: torch.Tensor,
                  rows: torch.Tensor, pages: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Semantics: for each i, t = rows[i]:  y[t] += Σ_j scales[i, j] * (x[t] · a_pages[pages[i, j]]) * b_pages[pages[i, j]].

    The decode form on CPU: one gather and two batched matmuls for all single-token rows,
    instead of two small matmuls per row. rows: [n] int64 (distinct), pages: [n, R] int64
    (valid ids; pad a lower-rank row with any valid id and scale 0), scales: [n, R].
    """
    n, rank = pages.shape
    flat = pages.reshape(-1)
    a = torch.index_select(a_pages, 0, flat).view(n, rank, -1)  # [n, R, in]
    b = torch.index_select(b_pages, 0, flat).view(n, rank, -1)  # [n, R, out]
    shrunk = torch.bmm(a, x[rows][:, :, None]) * scales[:, :, None].to(x.dtype)  # [n, R, 1]
    y.index_add_(0, rows, torch.bmm(shrunk.transpose(1, 2), b)[:, 0])  # [n, out]
    return y
