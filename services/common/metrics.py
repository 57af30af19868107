"""Prometheus metrics shared by every service: per-RPC counts, errors and latency.

Each service adds its own gauges next to these (through prometheus_client's default
registry) and exposes them all on its --metrics-port.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

RPC_REQUESTS = Counter(
    "loraplex_rpc_requests_total", "RPCs handled, by final status code", ["service", "method", "code"]
)
RPC_ERRORS = Counter(
    "loraplex_rpc_errors_total", "RPCs that ended with a status other than OK", ["service", "method", "code"]
)
RPC_LATENCY = Histogram(
    "loraplex_rpc_latency_seconds",
    "Time from RPC start to its last response",
    ["service", "method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RPC_IN_FLIGHT = Gauge("loraplex_rpc_in_flight", "RPCs currently running", ["service", "method"])


def start_metrics_server(host: str, port: int) -> None:
    """Serves /metrics over HTTP in a daemon thread (port 0 means disabled)."""
    if port:
        start_http_server(port, addr=host)
