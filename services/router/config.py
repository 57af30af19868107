"""Router process configuration (flags / LORAPLEX_* env, see services/common/config.py)."""

from __future__ import annotations

import dataclasses

from services.common.config import ClientTlsConfig, ServerConfig, option

DEFAULT_PORT = 50050
DEFAULT_HTTP_PORT = 8000


def _is_host_port(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) <= 65535


@dataclasses.dataclass(frozen=True)
class QuotaOverride:
    """Per-tenant quota from `--tenant-quota TENANT:CONCURRENT:TOKENS_PER_MINUTE`."""

    tenant: str  # tenant id or name
    max_concurrent: int
    tokens_per_minute: int

    @classmethod
    def parse(cls, text: str) -> QuotaOverride:
        parts = text.split(":")
        if len(parts) != 3 or not parts[0] or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"--tenant-quota must be TENANT:CONCURRENT:TOKENS_PER_MINUTE (0 = unlimited), "
                             f"got {text!r}")
        return cls(parts[0], int(parts[1]), int(parts[2]))


@dataclasses.dataclass(frozen=True)
class RouterConfig(ClientTlsConfig, ServerConfig):
    """loraplex Router: tenant auth, model resolution, placement and streaming proxy."""

    port: int = option(DEFAULT_PORT, "gRPC port")
    metrics_port: int = option(9400, "Prometheus /metrics HTTP port (0 disables it)")
    http_port: int = option(DEFAULT_HTTP_PORT, "OpenAI-compatible HTTP API port (0 picks a free port; "
                                               "-1 disables the HTTP API)")
    registry_address: str = option("127.0.0.1:50051", "host:port of the Registry")
    admin_token: str = option("", "bearer token the router presents to the Registry and accepts on Nodes")
    node: list[str] = option([], "host:port of an inference node (static membership)")
    node_poll_seconds: float = option(1.0, "how often each static node's GetStats is polled for load, "
                                           "resident adapters and health")
    node_timeout_seconds: float = option(2.0, "deadline of each health poll (health check + GetStats)")
    node_slow_polls: int = option(3, "consecutive health polls past their deadline before a node is marked "
                                     "unhealthy (a busy node answers late now and then; a refused connection "
                                     "or a node not serving is marked at once)")
    heartbeat_interval_seconds: float = option(2.0, "heartbeat interval asked of registered nodes; 3 missed "
                                                    "heartbeats mark a node unhealthy")
    load_balance_factor: float = option(1.25, "bounded-load factor c: no node takes more than c x the mean "
                                              "load (+1) while another is below it")
    max_attempts: int = option(3, "nodes tried for one request when they fail before the first token")
    auth_cache_seconds: float = option(60.0, "how long a verified API key is trusted without asking the "
                                             "Registry (revocations arrive sooner through the change feed)")
    resolve_cache_seconds: float = option(60.0, "how long a model-name resolution (or a tenant's model list) "
                                                "is kept (the change feed invalidates it sooner)")
    registry_timeout_seconds: float = option(5.0, "deadline for each Registry call")
    trainer_address: str = option("", "host:port of the Trainer, for the OpenAI Files and Fine-tuning API "
                                      "(/v1/files, /v1/fine_tuning/jobs); empty: those answer 501")
    trainer_timeout_seconds: float = option(60.0, "deadline of each Trainer call (a file upload included: the "
                                                  "Trainer validates every line before it answers)")
    max_upload_mb: int = option(64, "largest file upload to /v1/files (the whole multipart body), in MiB; "
                                    "larger is a 413")
    prefetch_adapters: bool = option(True, "when a deployment is bound or re-bound (or a version it follows is "
                                           "uploaded), have its adapter's home node fetch it into host memory, so "
                                           "its first request does not wait for the Registry download; when a node "
                                           "joins or returns, warm it the same way with the recently used adapters "
                                           "whose home it becomes (off: the first request fetches them)")
    tenant_max_concurrent: int = option(32, "default per-tenant limit of requests in flight (0 = unlimited)")
    tenant_tokens_per_minute: int = option(0, "default per-tenant limit of prompt + completion tokens per "
                                              "minute (0 = unlimited)")
    tenant_quota: list[str] = option([], "per-tenant override TENANT:CONCURRENT:TOKENS_PER_MINUTE, tenant "
                                         "by id or name, 0 = unlimited")

    def __post_init__(self) -> None:
        super().__post_init__()
        for address in self.node:
            if not _is_host_port(address):
                raise ValueError(f"--node must be host:port, got {address!r}")
        if not _is_host_port(self.registry_address):
            raise ValueError(f"--registry-address must be host:port, got {self.registry_address!r}")
        if self.trainer_address and not _is_host_port(self.trainer_address):
            raise ValueError(f"--trainer-address must be host:port (or empty), got {self.trainer_address!r}")
        if self.max_upload_mb < 1:
            raise ValueError(f"--max-upload-mb must be >= 1, got {self.max_upload_mb}")
        if not -1 <= self.http_port <= 65535:
            raise ValueError(f"--http-port must be in -1..65535, got {self.http_port}")
        positive = ("node_poll_seconds", "node_timeout_seconds", "heartbeat_interval_seconds",
                    "registry_timeout_seconds", "trainer_timeout_seconds")
        if self.node_slow_polls < 1:
            raise ValueError(f"--node-slow-polls must be >= 1, got {self.node_slow_polls}")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("auth_cache_seconds", "resolve_cache_seconds", "tenant_max_concurrent",
                     "tenant_tokens_per_minute"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.load_balance_factor < 1.0:
            raise ValueError(f"--load-balance-factor must be >= 1.0, got {self.load_balance_factor}")
        if self.max_attempts < 1:
            raise ValueError(f"--max-attempts must be >= 1, got {self.max_attempts}")
        self.quota_overrides  # noqa: B018 - validates every --tenant-quota now, at start-up

    @property
    def quota_overrides(self) -> list[QuotaOverride]:
        return [QuotaOverride.parse(text) for text in self.tenant_quota]

    @property
    def http_enabled(self) -> bool:
        return self.http_port >= 0

    @property
    def fine_tuning_enabled(self) -> bool:
        return bool(self.trainer_address)
