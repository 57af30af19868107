"""Where each per-step input of a graphed decode step lives in one flat int32 buffer.

A CUDA graph replays fixed device addresses, so every input of the step (token ids,
positions, KV slots, context lengths, block tables, and the LoRA tile plans of every
projection) gets a fixed place in one int32 buffer; the host fills a pinned twin and one
asynchronous copy moves it all. LoRA scales are float32 stored bit for bit in int32 words.
Regions start on 16-byte boundaries, so Triton sees aligned pointers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIGN = 4  # int32 words: 16 bytes


@dataclass(frozen=True)
class Region:
    start: int
    length: int

    @property
    def stop(self) -> int:
        return self.start + self.length


class GraphLayout:
    """Regions for a decode batch of `batch` rows; with `block_r` set, also the LoRA tiles of
    each module: `tile_capacity` tiles each (default `batch`, always enough: every tile holds
    at least one token; a smaller capacity serves steps whose adapters make fewer tiles)."""

    def __init__(self, batch: int, table_width: int, modules: tuple[str, ...], block_m: int,
                 block_r: int | None, tile_capacity: int | None = None) -> None:
        if tile_capacity is not None and tile_capacity < 1:
            raise ValueError(f"tile_capacity must be >= 1, got {tile_capacity}")
        self.batch, self.table_width, self.block_m, self.block_r = batch, table_width, block_m, block_r
        self.modules = modules if block_r is not None else ()
        # A base-only layout has no tiles: capacity 0, so (batch, block_r, tile_capacity) names any variant.
        self.tile_capacity = 0 if block_r is None else batch if tile_capacity is None else tile_capacity
        capacity = self.tile_capacity
        self._next = 0
        self.token_ids = self._take(batch)
        self.positions = self._take(batch)
        self.slots = self._take(batch)
        self.context_lens = self._take(batch)
        self.block_tables = self._take(batch * table_width)
        self.tile_rows = {m: self._take(capacity * block_m) for m in self.modules}
        self.tile_pages = {m: self._take(capacity * (block_r or 0)) for m in self.modules}
        self.tile_sizes = {m: self._take(capacity) for m in self.modules}
        self.tile_scales = {m: self._take(capacity) for m in self.modules}  # float32 bits
        self.size = self._next

    @property
    def key(self) -> tuple[int, int | None, int]:
        """(batch, block_r, tile_capacity): the variant's name in DecodeGraphs.variants and .replays."""
        return self.batch, self.block_r, self.tile_capacity

    def _take(self, length: int) -> Region:
        region = Region(self._next, length)
        self._next += -(-length // ALIGN) * ALIGN
        return region


def int_view(buffer: torch.Tensor, region: Region, *shape: int) -> torch.Tensor:
    return buffer[region.start:region.stop].view(*shape) if shape else buffer[region.start:region.stop]


def float_view(buffer: torch.Tensor, region: Region) -> torch.Tensor:
    return buffer[region.start:region.stop].view(torch.float32)
