"""Registry process configuration (flags / LORAPLEX_* env, see services/common/config.py).

Embedded defaults need nothing installed: SQLite in `<data-dir>/registry.db` and blobs in
`<data-dir>/blobs`. Production points `--database-url` at PostgreSQL and `--blob-store s3`
at MinIO or any S3 endpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar

from services.common.config import ServerConfig, option

DEFAULT_PORT = 50051
BLOB_STORES = ("local", "s3")
#: 100 years: the collector's cutoff date must stay a date, and anything that long means "never".
MAX_STALE_UPLOAD_HOURS = 100 * 365 * 24


@dataclasses.dataclass(frozen=True)
class StateConfig(ServerConfig):
    """Where a service keeps its state: SQL metadata and a blob store (Registry and Trainer)."""

    sqlite_file: ClassVar[str] = "state.db"  # under --data-dir when no --database-url is given

    data_dir: Path = option(Path(".loraplex"), "folder for the SQLite file, local blobs and upload spools")
    database_url: str = option("", "SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
                                   "(empty: a SQLite file in --data-dir)")
    blob_store: str = option("local", "where blobs live: local (<data-dir>/blobs) or s3")
    s3_endpoint: str = option("127.0.0.1:9000", "S3/MinIO host:port (with --blob-store s3)")
    s3_bucket: str = option("loraplex", "bucket (adapters/ and datasets/ prefixes, so the Registry and the "
                                        "Trainer may share it); created at start when missing")
    s3_access_key: str = option("", "S3 access key")
    s3_secret_key: str = option("", "S3 secret key")
    s3_region: str = option("us-east-1", "S3 region")
    s3_secure: bool = option(False, "use HTTPS to reach the S3 endpoint")
    s3_part_size_mb: int = option(16, "objects above this size are sent as multipart uploads of this part size")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blob_store not in BLOB_STORES:
            raise ValueError(f"--blob-store must be one of {', '.join(BLOB_STORES)}, got {self.blob_store!r}")
        if self.s3_part_size_mb < 5:
            raise ValueError(f"--s3-part-size-mb must be >= 5 (the S3 minimum part), got {self.s3_part_size_mb}")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / self.sqlite_file).resolve()}"


@dataclasses.dataclass(frozen=True)
class RegistryConfig(StateConfig):
    """loraplex Registry: tenants, keys, base models, adapters and deployments."""

    sqlite_file: ClassVar[str] = "registry.db"

    port: int = option(DEFAULT_PORT, "gRPC port")
    metrics_port: int = option(9401, "Prometheus /metrics HTTP port (0 disables it)")
    data_dir: Path = option(Path(".loraplex/registry"), "folder for the SQLite file, local blobs and upload spools")
    admin_token: str = option("", "bearer token for admin RPCs (empty: admin RPCs are refused)")
    max_upload_mb: int = option(1024, "largest adapter upload (and largest unpacked weights), in MiB")
    max_rank: int = option(256, "largest LoRA rank accepted")
    max_archive_files: int = option(8, "most entries a zip upload may hold (folders included)")
    max_zip_ratio: int = option(200, "largest uncompressed/compressed size ratio of a zip entry (zip bombs)")
    change_retention_hours: float = option(168.0, "change-feed events older than this are pruned "
                                                  "(at start and by CollectGarbage)")
    watch_poll_seconds: float = option(0.5, "how often WatchChanges polls the database for events "
                                            "written by other registry processes")
    # 24 h: far longer than any upload of adapter weights to the store runs (minutes for the
    # largest), so one in progress is never cut off, yet an outage's leftovers go within a day.
    s3_stale_upload_hours: float = option(24.0, "CollectGarbage aborts incomplete S3 multipart uploads under "
                                                 "adapters/ begun longer ago than this (an upload cut off by an S3 "
                                                 "outage leaves one, holding storage); 0 aborts all, even uploads "
                                                 "in progress")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_upload_mb", "max_rank", "max_archive_files", "max_zip_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.change_retention_hours <= 0:
            raise ValueError(f"--change-retention-hours must be > 0, got {self.change_retention_hours}")
        if self.watch_poll_seconds <= 0:
            raise ValueError(f"--watch-poll-seconds must be > 0, got {self.watch_poll_seconds}")
        if not 0 <= self.s3_stale_upload_hours <= MAX_STALE_UPLOAD_HOURS:
            raise ValueError(f"--s3-stale-upload-hours must be between 0 and {MAX_STALE_UPLOAD_HOURS} (100 years), "
                             f"got {self.s3_stale_upload_hours}")

    @property
    def max_upload_bytes(self) -> int:
        return self.max_upload_mb * 1024 * 1024
