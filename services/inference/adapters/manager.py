"""AdapterManager: the tiers above the device pool, and the scheduler's AdapterGate.

Tiers: device pool <- host cache (LRU by bytes) <- source (local folder or Registry).
Requests fetch their adapter into the host tier on the event loop before they queue
(`ensure_host`), so an unknown adapter fails that request alone with NOT_FOUND while
others keep running. The engine thread then copies host -> device pages in `try_acquire`
when the pool has room; if the host copy was dropped meanwhile, it asks for a re-fetch and
the sequence waits.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from typing import TypeVar

import torch

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.inference.adapters.pool import AdapterPool
from services.inference.adapters.sources import AdapterSource
from services.inference.adapters.weights import LoraWeights, parse_adapter
from services.inference.engine.scheduler import Admission
from services.inference.model.config import ModelArgs

T = TypeVar("T")


class AdapterManager:
    def __init__(self, pool: AdapterPool, args: ModelArgs, source: AdapterSource, host_capacity_bytes: int,
                 max_rank: int) -> None:
        self.pool, self.args, self.source = pool, args, source
        self.host_capacity_bytes, self.max_rank = host_capacity_bytes, max_rank
        self._host: OrderedDict[str, LoraWeights] = OrderedDict()
        self._host_lock = threading.Lock()
        self._fetching: dict[str, asyncio.Task] = {}
        self.load_ms: deque[float] = deque(maxlen=256)
        self.last_load_ms: dict[str, float] = {}
        self.hits = 0  # queued requests whose adapter bytes were on the device when they arrived
        self.misses = 0  # queued requests whose adapter bytes had to be fetched or copied there
        self.fetches = 0  # adapters fetched from the source into the host tier (prefetches included)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_arrival: Callable[[], None] = lambda: None  # wakes the engine
        # Queued requests for (adapter id, sha256, "" = any bytes) can never run (their re-fetch
        # failed, or pins leave no room): they must end with the error (set by the node).
        self.fail_waiting: Callable[[str, str, BaseException], None] = lambda adapter_id, sha256, error: None
        # Where parsing runs once the engine does (the node sets it: parse_runner).
        self.run_parse: Callable[[Callable[[], LoraWeights]], Awaitable[LoraWeights]] = asyncio.to_thread

    # --- event loop side ---
    def count_request(self, hit: bool) -> None:
        """Counts a request once queued: one refused (unknown adapter, bad digest, full queue)
        was never served, so it would skew the hit rate operators read from these."""
        if hit:
            self.hits += 1
        else:
            self.misses += 1

    def on_device(self, adapter_id: str, sha256: str = "") -> bool:
        """The adapter (with these bytes, when sha256 is given) is resident in the device pool."""
        resident = self.pool.get(adapter_id)
        return resident is not None and (not sha256 or resident.sha256 == sha256)

    async def ensure_host(self, adapter_id: str, sha256: str = "") -> LoraWeights:
        """The adapter's weights in host memory, fetching (once, shared) when missing."""
        with self._host_lock:
            weights = self._host.get(adapter_id)
            if weights is not None and (not sha256 or weights.sha256 == sha256):
                self._host.move_to_end(adapter_id)
                return weights
        task = self._fetching.get(adapter_id)
        if task is None:
            task = asyncio.ensure_future(self._fetch(adapter_id))
            self._fetching[adapter_id] = task
            task.add_done_callback(lambda _: self._fetching.pop(adapter_id, None))
        weights = await asyncio.shield(task)
        # The fetch is shared, so each caller checks its own digest: one naming wrong bytes fails
        # alone, not every request that met it on the same fetch.
        _check_digest(adapter_id, weights, sha256)
        return weights

    async def _fetch(self, adapter_id: str) -> LoraWeights:
        started = time.perf_counter()
        fetched = await self.source.fetch(adapter_id)
        try:
            weights = await self.run_parse(
                lambda: parse_adapter(fetched.config_json, fetched.weights, self.args, self.pool.dtype,
                                      pin_memory=self.pool.device.type == "cuda", sha256=fetched.sha256))
        except InvalidArgument as exc:
            # The request naming it is fine; the adapter cannot run on this base model (built for
            # another one, or a variant we do not serve): a state of the adapter, not of the call.
            raise FailedPrecondition(f"adapter {adapter_id} cannot be served by this node's base model: "
                                     f"{exc.message}", reason="ADAPTER_INCOMPATIBLE", adapter_id=adapter_id) from exc
        _check_digest(adapter_id, weights, fetched.expected_sha256)
        if weights.rank > self.max_rank:
            raise FailedPrecondition(f"adapter {adapter_id} has rank {weights.rank}; this node serves "
                                     f"ranks up to {self.max_rank}")
        if weights.rank > self.pool.num_pages:
            # It could never be admitted: its requests would wait forever (and, once starving,
            # pause every other adapter's admissions).
            raise FailedPrecondition(f"adapter {adapter_id} has rank {weights.rank}; this node's adapter pool "
                                     f"holds {self.pool.num_pages} pages in all", reason="ADAPTER_RANK_EXCEEDS_POOL",
                                     rank=weights.rank, pool_pages=self.pool.num_pages)
        self._put_host(adapter_id, weights)
        self.fetches += 1
        elapsed = (time.perf_counter() - started) * 1000
        self.load_ms.append(elapsed)
        self.last_load_ms[adapter_id] = elapsed
        self.on_arrival()
        return weights

    def _put_host(self, adapter_id: str, weights: LoraWeights) -> None:
        with self._host_lock:
            self._host[adapter_id] = weights
            self._host.move_to_end(adapter_id)
            while len(self._host) > 1 and sum(w.nbytes for w in self._host.values()) > self.host_capacity_bytes:
                self._host.popitem(last=False)

    def loading(self) -> list[str]:
        return list(self._fetching)

    def host_entries(self) -> dict[str, LoraWeights]:
        with self._host_lock:
            return dict(self._host)

    def drop_host(self, adapter_id: str) -> bool:
        with self._host_lock:
            return self._host.pop(adapter_id, None) is not None

    # --- engine thread side ---
    def check_room(self, adapter_id: str, rank: int) -> None:
        """ResourceExhausted when pinned adapters leave too few pages for this rank: its request
        would wait until an operator unpins (and, once starving, pause the other adapters)."""
        if (error := self._pinned_out(adapter_id, rank)) is not None:
            raise error

    def _pinned_out(self, adapter_id: str, rank: int) -> ResourceExhausted | None:
        pinned = sum(r.rank for r in self.pool.resident() if r.pinned and r.key != adapter_id)
        if rank <= self.pool.num_pages - pinned:
            return None
        return ResourceExhausted(f"adapter {adapter_id} needs {rank} pages, but pinned adapters hold {pinned} of the "
                                 f"pool's {self.pool.num_pages}: it fits once some are unpinned (EvictAdapter with "
                                 "unpin)", retry_after_s=5.0, reason="ADAPTER_POOL_PINNED", rank=rank,
                                 pinned_pages=pinned)

    # --- engine thread side: the scheduler's AdapterGate ---
    def try_acquire(self, adapter_key: str, sha256: str = "") -> Admission:
        resident = self.pool.get(adapter_key)
        weights = self._host_copy(adapter_key, sha256)
        # A host copy read since the resident one was loaded, with the same weights under another
        # config (an edited local adapter folder), replaces it: it computes something else.
        newer = weights is not None and resident is not None and weights.fingerprint != resident.fingerprint
        if resident is not None and (not sha256 or resident.sha256 == sha256) and not newer:
            self.pool.acquire(adapter_key)
            return Admission.ADMITTED
        if weights is None:
            if self.loop is not None:  # dropped from (or replaced in) the host tier since the request queued
                self.loop.call_soon_threadsafe(self._refetch, adapter_key, sha256)
            return Admission.FETCHING
        if resident is not None and resident.refs:
            return Admission.NO_ROOM  # other bytes under this id serve running requests: replaced once they finish
        if not self.pool.can_fit(weights.rank, replacing=adapter_key):
            # Pins taken since these requests queued (check_room passed then) can leave no room
            # until an unpin: fail them as if they had arrived after the pin. Through the node, not
            # here: the scheduler is walking its queues.
            if (error := self._pinned_out(adapter_key, weights.rank)) is not None:
                self.fail_waiting(adapter_key, sha256, error)
            return Admission.NO_ROOM
        self.pool.load(adapter_key, weights)  # replaces a resident copy with other bytes
        self.pool.acquire(adapter_key)
        return Admission.ADMITTED

    def release(self, adapter_key: str) -> None:
        self.pool.release(adapter_key)

    def resident_sha256(self, adapter_key: str) -> str | None:
        resident = self.pool.get(adapter_key)
        return resident.fingerprint if resident is not None else None

    def _host_copy(self, adapter_key: str, sha256: str) -> LoraWeights | None:
        """The host tier's copy of the adapter, if it holds these bytes ("" = any)."""
        with self._host_lock:
            weights = self._host.get(adapter_key)
        return weights if weights is not None and (not sha256 or weights.sha256 == sha256) else None

    def _refetch(self, adapter_id: str, sha256: str = "") -> None:
        if adapter_id not in self._fetching:
            task = asyncio.ensure_future(self.ensure_host(adapter_id, sha256))
            task.add_done_callback(lambda t: self._refetched(adapter_id, sha256, t))

    def _refetched(self, adapter_id: str, sha256: str, task: asyncio.Future) -> None:
        # Only the requests that asked for these bytes: one naming other bytes (or any) asks for
        # its own re-fetch when it reaches the head of the queue, and fails only if that fails.
        if not task.cancelled() and (error := task.exception()) is not None:
            self.fail_waiting(adapter_id, sha256, error)


def _check_digest(adapter_id: str, weights: LoraWeights, expected: str) -> None:
    if expected and weights.sha256 != expected:
        raise FailedPrecondition(f"adapter {adapter_id}: sha256 {weights.sha256} does not match the expected "
                                 f"{expected}", reason="ADAPTER_DIGEST_MISMATCH", field="adapter.sha256")


def parse_runner(device: torch.device, engine_call: Callable[[Callable[[], T]], Awaitable[T]]
                 ) -> Callable[[Callable[[], T]], Awaitable[T]]:
    """Where a node parses adapters once its engine runs. A CPU node: on the engine's torch
    thread, between steps, since a second OpenMP team slows the engine's CPU GEMMs
    (engine/torch_thread.py). A CUDA node: beside the engine thread, which runs no CPU GEMMs;
    between its steps, a cold adapter's parse (~0.1 s at Llama-3-8B's shape) would hold every
    running request's next token."""
    return asyncio.to_thread if device.type == "cuda" else engine_call
