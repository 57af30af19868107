"""Router Prometheus metrics (served on --metrics-port with the shared RPC metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

PLACEMENTS = Counter("loraplex_router_placements_total", "Requests placed on a node, by why that node",
                     ["reason"])
RETRIES = Counter("loraplex_router_node_retries_total",
                  "Attempts that failed before the first token and were retried on another node", ["reason"])
MID_STREAM_FAILURES = Counter("loraplex_router_mid_stream_failures_total",
                              "Streams that lost their node after the first token")
QUOTA_REJECTIONS = Counter("loraplex_router_quota_rejections_total", "Requests refused by a tenant quota",
                           ["reason"])
HEALTHY_NODES = Gauge("loraplex_router_healthy_nodes", "Inference nodes currently placeable")
