"""Operator views and actions on a node: adapter residency, stats, model info.

Pool state belongs to the engine thread, so every read or change runs there through
AsyncEngine.call; these functions only shape the results for the servicer and metrics.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.fields import require
from services.inference.adapters.pool import ResidentAdapter
from services.inference.node import Node, expected_digest
from services.registry.fingerprint import ArchitectureFingerprint, fingerprint_from_config


@dataclasses.dataclass
class SlotView:
    adapter_id: str
    sha256: str
    tier: str  # DEVICE, HOST or LOADING
    rank: int
    pages: int
    pinned: bool
    active_requests: int
    last_used: float
    load_ms: float
    target_modules: frozenset[str]


@dataclasses.dataclass
class PoolUsageView:
    pages_total: int
    pages_used: int
    pages_free: int
    host_bytes_used: int
    host_bytes_total: int


@dataclasses.dataclass
class StatsView:
    running_requests: int
    waiting_requests: int
    kv_blocks_used: int
    kv_blocks_total: int
    resident_adapters: int
    pool: PoolUsageView
    adapter_hits: int
    adapter_misses: int
    adapter_loads: int
    adapter_evictions: int
    adapter_load_ms_mean: float
    adapter_load_ms_p99: float
    requests_finished: int
    prompt_tokens_total: int
    generated_tokens_total: int
    preemptions: int
    generation_tokens_per_second: float
    resident_adapter_ids: list[str]
    graph_steps: int
    eager_steps: int
    prompt_tokens_cached: int
    prompt_tokens_computed: int
    prefix_cache_hit_rate: float
    kv_blocks_cached: int
    adapter_fetches: int


@dataclasses.dataclass
class InfoView:
    node_id: str
    base_model: str
    fingerprint: ArchitectureFingerprint
    dtype: str
    device: str
    max_context: int
    kv_block_size: int
    max_batch_tokens: int
    adapter_pool_pages: int
    max_adapter_rank: int
    version: str
    kernels: str
    cuda_graphs: str
    prefill_lora: str
    decode_lora: str


class PoolAdmin:
    def __init__(self, node: Node) -> None:
        self.node = node
        self._rate_mark = (time.monotonic(), 0)
        self._rate = 0.0

    async def load(self, adapter_id: str, pin: bool, host_only: bool = False, sha256: str = "") -> SlotView:
        require(adapter_id, "adapter_id")
        sha256 = expected_digest(sha256)
        if host_only:
            if pin:
                raise InvalidArgument("pin keeps an adapter in the device pool; a host_only load takes no device "
                                      "pages, so it cannot pin", field="pin")
            return await self._warm_host(adapter_id, sha256)
        weights = await self.node.manager.ensure_host(adapter_id, sha256)

        def load_on_engine() -> SlotView:
            # When pins hold the room, retrying cannot help until an unpin: Generate's
            # ADAPTER_POOL_PINNED says so, where pool.load would answer "pool full, retry soon".
            self.node.manager.check_room(adapter_id, weights.rank)
            # Viewed in the same engine call: a step in between could evict an unpinned adapter.
            self.node.pool.load(adapter_id, weights, pinned=pin)
            slots, _ = self._snapshot_on_engine()
            return next(s for s in slots if s.adapter_id == adapter_id and s.tier == "DEVICE")

        return await self.node.async_engine.call(load_on_engine)

    async def _warm_host(self, adapter_id: str, sha256: str) -> SlotView:
        """The host-tier half of a load (the router's prefetch): the next request copies host ->
        device instead of waiting on the Registry. The device pool is left alone: a prefetch ahead
        of traffic must never evict an adapter that traffic is using."""
        def device_slot_on_engine() -> SlotView | None:
            resident = self.node.pool.get(adapter_id)
            if resident is None or (sha256 and resident.sha256 != sha256):
                return None
            return self._device_view(resident)

        # Already on the device: no host copy needed (as for Generate, which then counts a hit).
        if (slot := await self.node.async_engine.call(device_slot_on_engine)) is not None:
            return slot
        weights = await self.node.manager.ensure_host(adapter_id, sha256)  # a host copy is not fetched again
        # Viewed from the weights, not the host tier: a small tier may already have dropped them again.
        return SlotView(adapter_id, weights.sha256, "HOST", weights.rank, 0, False, 0, 0.0,
                        self.node.manager.last_load_ms.get(adapter_id, 0.0), weights.target_modules)

    def _device_view(self, resident: ResidentAdapter) -> SlotView:
        return SlotView(resident.key, resident.sha256, "DEVICE", resident.rank, resident.rank, resident.pinned,
                        resident.refs, resident.last_used, self.node.manager.last_load_ms.get(resident.key, 0.0),
                        resident.target_modules)

    async def evict(self, adapter_id: str, all_tiers: bool, unpin: bool) -> None:
        require(adapter_id, "adapter_id")

        def evict_on_engine() -> bool:
            resident = self.node.pool.get(adapter_id)
            if resident is None:
                return False
            if resident.pinned and not unpin:  # a pin is there to keep it resident: dropping it is explicit
                raise FailedPrecondition(f"adapter {adapter_id} is pinned; set unpin to evict it",
                                         reason="ADAPTER_PINNED", field="unpin")
            # Raises while running requests use it, before anything changed (the pin goes with
            # the eviction, so a refused call leaves it pinned).
            self.node.pool.evict(adapter_id)
            return True

        evicted = await self.node.async_engine.call(evict_on_engine)
        dropped = all_tiers and self.node.manager.drop_host(adapter_id)
        if not evicted and not dropped:
            raise NotFound(f"adapter {adapter_id} is not resident on this node")

    async def snapshot(self) -> tuple[list[SlotView], PoolUsageView]:
        return await self.node.async_engine.call(self._snapshot_on_engine)

    def _snapshot_on_engine(self) -> tuple[list[SlotView], PoolUsageView]:
        manager, pool = self.node.manager, self.node.pool
        slots = [self._device_view(r) for r in pool.resident()]
        host = manager.host_entries()
        for key, weights in host.items():
            # One entry per copy: the host copy of the bytes on the device is the same adapter,
            # but other bytes there (waiting for the device copy's requests to end) are not.
            if (resident := pool.get(key)) is None or resident.sha256 != weights.sha256:
                slots.append(SlotView(key, weights.sha256, "HOST", weights.rank, 0, False, 0, 0.0,
                                      manager.last_load_ms.get(key, 0.0), weights.target_modules))
        slots += [SlotView(key, "", "LOADING", 0, 0, False, 0, 0.0, 0.0, frozenset()) for key in manager.loading()]
        usage = PoolUsageView(pool.num_pages, pool.num_pages - pool.num_free_pages, pool.num_free_pages,
                              sum(w.nbytes for w in host.values()), manager.host_capacity_bytes)
        return slots, usage

    async def stats(self) -> StatsView:
        slots, usage = await self.snapshot()
        engine, manager, pool = self.node.engine, self.node.manager, self.node.pool
        scheduler = engine.scheduler
        blocks = scheduler.block_manager
        load_ms = sorted(manager.load_ms)
        admitted_tokens = blocks.prompt_tokens_cached + blocks.prompt_tokens_computed
        return StatsView(
            running_requests=scheduler.num_running, waiting_requests=scheduler.num_waiting,
            kv_blocks_used=blocks.num_used_blocks, kv_blocks_total=self.node.num_kv_blocks,
            resident_adapters=len(pool.resident()), pool=usage, adapter_hits=manager.hits,
            adapter_misses=manager.misses, adapter_loads=pool.counters.loads,
            adapter_evictions=pool.counters.evictions,
            adapter_load_ms_mean=sum(load_ms) / len(load_ms) if load_ms else 0.0,
            adapter_load_ms_p99=load_ms[min(len(load_ms) - 1, int(0.99 * len(load_ms)))] if load_ms else 0.0,
            requests_finished=engine.finished_requests, prompt_tokens_total=engine.prompt_tokens,
            generated_tokens_total=engine.generated_tokens, preemptions=scheduler.num_preemptions,
            generation_tokens_per_second=self._tokens_per_second(engine.generated_tokens),
            resident_adapter_ids=[s.adapter_id for s in slots if s.tier == "DEVICE"],
            graph_steps=engine.runner.steps["graph"], eager_steps=engine.runner.steps["eager"],
            prompt_tokens_cached=blocks.prompt_tokens_cached, prompt_tokens_computed=blocks.prompt_tokens_computed,
            prefix_cache_hit_rate=blocks.prompt_tokens_cached / admitted_tokens if admitted_tokens else 0.0,
            kv_blocks_cached=blocks.num_cached_free_blocks, adapter_fetches=manager.fetches)

    def _tokens_per_second(self, generated: int) -> float:
        now = time.monotonic()
        then, before = self._rate_mark
        if now - then >= 1.0:
            self._rate = (generated - before) / (now - then)
            self._rate_mark = (now, generated)
        return self._rate

    def info(self) -> InfoView:
        config, runner = self.node.config, self.node.engine.runner
        fingerprint = fingerprint_from_config(json.loads((Path(config.base_model) / "config.json").read_text()))
        return InfoView(config.resolved_node_id, config.resolved_base_model_name, fingerprint,
                        str(self.node.dtype).removeprefix("torch."),
                        config.device, self.node.max_context, config.block_size, config.max_batched_tokens,
                        config.adapter_pool_pages, config.max_adapter_rank, "0.1.0", runner.kernels,
                        runner.graph_mode, runner.prefill_lora.summary(), runner.decode_lora.summary())
