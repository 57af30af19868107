"""Prometheus gauges of an inference node, refreshed from its stats: one per figure GetStats
reports (its proto says they are exported), so a dashboard and grpcurl tell the same story."""

from __future__ import annotations

from prometheus_client import Gauge

from services.inference.pool_admin import StatsView

_GAUGES = {
    name: Gauge(f"loraplex_inference_{name}", help_text)
    for name, help_text in {
        "running_requests": "sequences running",
        "waiting_requests": "sequences waiting (queue depth)",
        "kv_blocks_used": "paged KV blocks in use",
        "kv_blocks_total": "paged KV blocks in all",
        "resident_adapters": "adapters in the device pool",
        "adapter_pages_total": "adapter pool pages in all",
        "adapter_pages_used": "adapter pool pages in use",
        "adapter_pages_free": "adapter pool pages free",
        "adapter_host_bytes_used": "bytes of adapters held in the host-memory tier",
        "adapter_host_bytes_total": "capacity of the host-memory adapter tier, in bytes",
        "adapter_hits": "queued LoRA requests whose adapter bytes were already on the device",
        "adapter_misses": "queued LoRA requests whose adapter had to be fetched or copied to the device",
        "adapter_loads": "adapter loads into the device pool",
        "adapter_evictions": "adapter evictions from the device pool",
        "adapter_load_ms_mean": "mean adapter fetch+parse latency (ms), recent window",
        "adapter_load_ms_p99": "p99 adapter fetch+parse latency (ms), recent window",
        "requests_finished": "requests that ran to their end (stop or length; cancelled ones are not counted)",
        "prompt_tokens_total": "prompt tokens of the requests queued",
        "generated_tokens_total": "tokens generated",
        "generation_tokens_per_second": "tokens generated per second, recent window",
        "preemptions": "sequences preempted (KV exhausted)",
        "graph_steps": "engine steps through the graphed decode step (a CUDA graph replay unless --cuda-graphs static)",
        "eager_steps": "engine steps run eagerly (prefill, mixed, or no graph for the batch)",
        "prompt_tokens_cached": "tokens of admitted requests whose KV was read from the prefix cache",
        "prompt_tokens_computed": "tokens of admitted requests left to compute (not in the prefix cache)",
        "prefix_cache_hit_rate": "prompt_tokens_cached / (prompt_tokens_cached + prompt_tokens_computed)",
        "kv_blocks_cached": "free paged KV blocks still holding a cached prefix (evictable)",
        "adapter_fetches": "adapters fetched from the Registry (or adapter folder) into the host tier, prefetches included",
    }.items()
}


def publish(stats: StatsView) -> None:
    values = {**vars(stats), **{f"adapter_{name}": value for name, value in vars(stats.pool).items()}}
    for name, gauge in _GAUGES.items():
        gauge.set(values[name])
