"""Registry process configuration (flags / LORAPLEX_* env, see services/common/config.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.common.config import ServerConfig, option

DEFAULT_PORT = 50051


@dataclasses.dataclass(frozen=True)
class RegistryConfig(ServerConfig):
    """loraplex Registry: tenants, keys, base models, adapters and deployments."""

    port: int = option(DEFAULT_PORT, "gRPC port")
    metrics_port: int = option(9401, "Prometheus /metrics HTTP port (0 disables it)")
    data_dir: Path = option(Path(".loraplex/registry"), "folder for the SQLite file and local blobs")
    admin_token: str = option("", "bearer token for admin RPCs (empty: admin RPCs are refused)")
