"""Inference node configuration (flags / LORAPLEX_* env, see services/common/config.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.common.config import ServerConfig, option

DEFAULT_PORT = 50053


@dataclasses.dataclass(frozen=True)
class InferenceConfig(ServerConfig):
    """loraplex Inference node: resident base model, paged adapter pool, batched LoRA."""

    port: int = option(DEFAULT_PORT, "gRPC port")
    metrics_port: int = option(9403, "Prometheus /metrics HTTP port (0 disables it)")
    base_model: Path | None = option(None, "Hugging Face checkpoint folder of the base model (required)")
    base_model_name: str = option("tiny", "the base model's name in the Registry")
    registry_address: str = option("127.0.0.1:50051", "host:port of the Registry (adapter downloads)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_model is None:
            raise ValueError("--base-model is required: a Hugging Face checkpoint folder "
                             "(build a test one with `loraplex model tiny DIR`)")
