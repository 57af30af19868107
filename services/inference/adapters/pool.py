"""The paged adapter pool on the device (S-LoRA style, no padding to a max rank).

For every module m the pool holds A[m]: [L, P, in_m] and B[m]: [L, P, out_m] (B stored
transposed, one row per rank index). An adapter of rank r owns r page ids — the same in
every layer and module — taken from a free list (an adapter whose modules differ in rank, by
rank_pattern, has its largest: weights.py pads the others). Adapters are evicted
least-recently-used first, and only when no running sequence references them and they are
not pinned.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from services.common.errors import FailedPrecondition, NotFound, ResourceExhausted
from services.inference.adapters.batch import AdapterSegments
from services.inference.adapters.weights import LoraWeights
from services.inference.engine.host_lists import to_device_async
from services.inference.kernels.reference import Segment
from services.inference.model.config import LORA_MODULES, ModelArgs


@dataclass
class ResidentAdapter:
    key: str
    pages: torch.Tensor  # [r] int64 page ids
    page_ids: tuple[int, ...]  # the same ids on the host (per-step planning reads these)
    rank: int
    scaling: float
    target_modules: frozenset[str]
    sha256: str
    fingerprint: str  # LoraWeights.fingerprint: bytes and config
    refs: int = 0
    pinned: bool = False
    last_used: float = field(default_factory=time.time)


@dataclass
class PoolCounters:
    # Hits and misses are per request, counted by the AdapterManager.
    loads: int = 0
    evictions: int = 0


class AdapterPool:
    def __init__(self, args: ModelArgs, num_pages: int, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        if num_pages < 1:
            raise ValueError("the adapter pool needs at least one page")
        self.num_pages, self.dtype, self.device = num_pages, dtype, torch.device(device)
        shapes = args.module_shapes()
        layers = args.num_layers
        self.a = {m: torch.zeros(layers, num_pages, shapes[m][0], dtype=dtype, device=device) for m in LORA_MODULES}
        self.b = {m: torch.zeros(layers, num_pages, shapes[m][1], dtype=dtype, device=device) for m in LORA_MODULES}
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._resident: OrderedDict[str, ResidentAdapter] = OrderedDict()  # oldest use first
        self.counters = PoolCounters()

    # --- queries ---
    def shapes(self) -> dict[str, tuple[int, int]]:
        """module -> (in_features, out_features) of its pages."""
        return {module: (self.a[module].shape[-1], self.b[module].shape[-1]) for module in self.a}

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def resident(self) -> list[ResidentAdapter]:
        return list(self._resident.values())

    def get(self, key: str) -> ResidentAdapter | None:
        return self._resident.get(key)

    def can_fit(self, rank: int, replacing: str | None = None) -> bool:
        """Room for `rank` pages after evicting unreferenced, unpinned adapters (and `replacing`,
        an unreferenced copy of the same id with other bytes, pinned or not)."""
        evictable = sum(r.rank for r in self._resident.values()
                        if r.refs == 0 and (not r.pinned or r.key == replacing))
        return rank <= len(self._free) + evictable

    # --- residency ---
    def load(self, key: str, weights: LoraWeights, pinned: bool = False) -> ResidentAdapter:
        """Copies an adapter into free pages, evicting LRU unreferenced adapters if needed."""
        if (existing := self._resident.get(key)) is not None and existing.fingerprint == _fingerprint(weights):
            existing.pinned = existing.pinned or pinned
            return existing
        if existing is not None and existing.refs:
            raise FailedPrecondition(f"adapter {key} is used by {existing.refs} running requests")
        if weights.rank > self.num_pages:
            raise ResourceExhausted(f"adapter {key} needs {weights.rank} pages; the pool has {self.num_pages}")
        if not self.can_fit(weights.rank, replacing=key):
            raise ResourceExhausted(f"adapter pool full: {key} needs {weights.rank} pages, "
                                    f"{len(self._free)} free and the rest in use", retry_after_s=0.5)
        if existing is not None:  # the same id with other bytes: replace it, keeping its pin
            pinned = pinned or existing.pinned
            self.evict(key)
        while len(self._free) < weights.rank:
            victim = next(r for r in self._resident.values() if r.refs == 0 and not r.pinned)
            self.evict(victim.key)
        page_ids = [self._free.pop() for _ in range(weights.rank)]
        pages = to_device_async(page_ids, torch.int64, self.device)
        self._write(pages, weights)
        adapter = ResidentAdapter(key, pages, tuple(page_ids), weights.rank, weights.scaling, weights.target_modules,
                                  weights.sha256, _fingerprint(weights), pinned=pinned)
        self._resident[key] = adapter
        self.counters.loads += 1
        return adapter

    def _write(self, pages: torch.Tensor, weights: LoraWeights) -> None:
        """One copy per module and side, queued on the stream like a kernel: the host form is
        the pages' layout in their dtype (weights.py), pinned on CUDA, so the engine thread
        does not wait for the transfer, and the next step's kernels, queued after it, see it."""
        for module in LORA_MODULES:
            for pool_side, host_side in ((self.a, weights.a), (self.b, weights.b)):
                host = host_side.get(module)
                if host is None:  # pages are reused: an absent module must contribute nothing
                    pool_side[module].index_fill_(1, pages, 0)
                else:
                    pool_side[module].index_copy_(1, pages, host.to(self.device, self.dtype, non_blocking=True))

    def evict(self, key: str) -> None:
        adapter = self._resident.get(key)
        if adapter is None:
            raise NotFound(f"adapter {key} is not resident")
        if adapter.refs:
            raise FailedPrecondition(f"adapter {key} is used by {adapter.refs} running requests")
        del self._resident[key]
        self._free.extend(adapter.page_ids)  # the host's copy: reading the device's would wait for its queue
        self.counters.evictions += 1

    def set_pinned(self, key: str, pinned: bool) -> None:
        adapter = self._resident.get(key)
        if adapter is None:
            raise NotFound(f"adapter {key} is not resident")
        adapter.pinned = pinned

    # --- references held by running sequences ---
    def acquire(self, key: str) -> ResidentAdapter:
        adapter = self._resident[key]
        adapter.refs += 1
        adapter.last_used = time.time()
        self._resident.move_to_end(key)
        return adapter

    def release(self, key: str) -> None:
        adapter = self._resident.get(key)
        if adapter is not None and adapter.refs > 0:
            adapter.refs -= 1

    def segments_of(self, key: str, start: int, end: int) -> AdapterSegments:
        adapter = self._resident[key]
        return AdapterSegments([Segment(start, end, adapter.pages, adapter.scaling, adapter.page_ids)],
                               adapter.target_modules)


def _fingerprint(weights: LoraWeights) -> str:
    return weights.fingerprint or weights.sha256
