"""Router Prometheus metrics (served on --metrics-port with the shared RPC metrics).

Per-tenant series are labelled by tenant name and by the model name the caller used, and only
for requests whose model resolved: a caller cannot add series by sending made-up names, so
their number is bounded by the tenants and their deployments.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PLACEMENTS = Counter("loraplex_router_placements_total", "Requests placed on a node, by why that node",
                     ["reason"])
RETRIES = Counter("loraplex_router_node_retries_total",
                  "Attempts that failed before the first token and were retried on another node", ["reason"])
MID_STREAM_FAILURES = Counter("loraplex_router_mid_stream_failures_total",
                              "Streams that lost their node after the first token")
QUOTA_REJECTIONS = Counter("loraplex_router_quota_rejections_total", "Requests refused by a tenant quota",
                           ["tenant", "reason"])
HEALTHY_NODES = Gauge("loraplex_router_healthy_nodes", "Inference nodes currently placeable")
TENANT_REQUESTS = Counter(
    "loraplex_router_tenant_requests_total",
    "Requests that got a first token, by tenant, model (as the caller named it) and how they ended: "
    "stop, length, error (after the first token), cancelled (closed by the caller first)",
    ["tenant", "model", "outcome"])
TENANT_TOKENS = Counter(
    "loraplex_router_tenant_tokens_total",
    "Tokens by tenant, model and kind, as usage reports them: prompt (once per request, however many "
    "choices), cached_prompt (the part of the prompt read from a node's prefix cache), completion, reasoning (the "
    "part of completion a thinking model spent thinking)",
    ["tenant", "model", "kind"])
TIME_TO_FIRST_TOKEN = Histogram(
    "loraplex_router_time_to_first_token_seconds",
    "From a request's arrival at the router (authenticated) to its first token, failovers included, by base model",
    ["base_model"], buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
ADAPTER_PREFETCHES = Counter(
    "loraplex_router_adapter_prefetches_total",
    "Adapters of bound or re-bound deployments (and, when a node joins or returns, the recently used ones whose "
    "home it becomes) warmed into their home node's host tier ahead of traffic (--prefetch-adapters), by "
    "outcome: host (fetched there now), device (resident there already), not_found "
    "(the deployment or adapter went meanwhile), no_node (no healthy node serves its base model), failed (node "
    "or Registry error: its first request fetches it, as without prefetch), dropped (too many waiting)",
    ["outcome"])
