"""Trainer process configuration (flags / LORAPLEX_* env, see services/common/config.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.common.config import ServerConfig, option

DEFAULT_PORT = 50052


@dataclasses.dataclass(frozen=True)
class TrainerConfig(ServerConfig):
    """loraplex Trainer: LoRA fine-tuning jobs published to the Registry."""

    port: int = option(DEFAULT_PORT, "gRPC port")
    metrics_port: int = option(9402, "Prometheus /metrics HTTP port (0 disables it)")
    data_dir: Path = option(Path(".loraplex/trainer"), "folder for job state and checkpoints")
    registry_address: str = option("127.0.0.1:50051", "host:port of the Registry")
    admin_token: str = option("", "bearer token the trainer presents to the Registry")
