"""Router process configuration (flags / LORAPLEX_* env, see services/common/config.py)."""

from __future__ import annotations

import dataclasses

from services.common.config import ServerConfig, option

DEFAULT_PORT = 50050


@dataclasses.dataclass(frozen=True)
class RouterConfig(ServerConfig):
    """loraplex Router: tenant auth, model resolution, placement and streaming proxy."""

    port: int = option(DEFAULT_PORT, "gRPC port")
    metrics_port: int = option(9400, "Prometheus /metrics HTTP port (0 disables it)")
    registry_address: str = option("127.0.0.1:50051", "host:port of the Registry")
    admin_token: str = option("", "bearer token the router presents to the Registry and accepts on Nodes")
    node: list[str] = option([], "host:port of an inference node (static membership)")

    def __post_init__(self) -> None:
        super().__post_init__()
        for address in self.node:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--node must be host:port, got {address!r}")
