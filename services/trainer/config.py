"""Trainer process configuration (flags / LORAPLEX_* env, see services/common/config.py).

Embedded defaults need nothing installed: SQLite in `<data-dir>/trainer.db`, datasets in
`<data-dir>/blobs` (the Registry's local-folder blob store implementation), job folders in
`<data-dir>/jobs`, one job at a time on the CPU. Production points `--database-url` at
PostgreSQL, `--blob-store s3` at MinIO/S3 (datasets live under the `datasets/` prefix, so the
Registry's bucket may be shared: its garbage collector only looks under `adapters/`) and
`--devices` at the GPUs (one job per device at a time).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from services.common.config import ServerConfig, option

DEFAULT_PORT = 50052
BLOB_STORES = ("local", "s3")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclasses.dataclass(frozen=True)
class TrainerConfig(ServerConfig):
    """loraplex Trainer: LoRA fine-tuning jobs published to the Registry."""

    port: int = option(DEFAULT_PORT, "gRPC port")
    metrics_port: int = option(9402, "Prometheus /metrics HTTP port (0 disables it)")
    data_dir: Path = option(Path(".loraplex/trainer"), "folder for the SQLite file, local dataset blobs, upload "
                                                          "spools and job folders (checkpoints, logs)")
    registry_address: str = option("127.0.0.1:50051", "host:port of the Registry")
    admin_token: str = option("", "bearer token the trainer presents to the Registry; callers presenting it "
                                  "are operators (empty: only tenant API keys are accepted)")
    registry_timeout_seconds: float = option(60.0, "deadline of each Registry call (uploads included)")
    auth_cache_seconds: float = option(10.0, "how long a verified API key or tenant name is trusted before "
                                             "the Registry is asked again (0: every call asks)")
    database_url: str = option("", "SQLAlchemy URL, e.g. postgresql+psycopg://user@host/db "
                                   "(empty: SQLite file <data-dir>/trainer.db)")
    blob_store: str = option("local", "where datasets live: local (<data-dir>/blobs) or s3")
    s3_endpoint: str = option("127.0.0.1:9000", "S3/MinIO host:port (with --blob-store s3)")
    s3_bucket: str = option("loraplex", "bucket for datasets (prefix datasets/); created at start when missing")
    s3_access_key: str = option("", "S3 access key")
    s3_secret_key: str = option("", "S3 secret key")
    s3_region: str = option("us-east-1", "S3 region")
    s3_secure: bool = option(False, "use HTTPS to reach the S3 endpoint")
    s3_part_size_mb: int = option(16, "datasets above this size are sent as multipart uploads of this part size")
    max_dataset_mb: int = option(512, "largest dataset upload, in MiB")
    max_rank: int = option(256, "largest LoRA rank a job may ask for (keep it equal to the Registry's --max-rank)")
    devices: list[str] = option(["cpu"], "training devices; one job runs on each at a time (cpu, cuda:0, ...)")
    dtype: str = option("auto", "base weights dtype while training: auto (float32 on cpu, bfloat16 on cuda), "
                                "float32, bfloat16 or float16; LoRA weights always train in float32")
    torch_threads: int = option(0, "CPU threads of each training worker (0: torch's default)")
    keep_checkpoints: int = option(2, "checkpoints kept per running job (older ones are deleted)")
    cancel_grace_seconds: float = option(5.0, "after a cancel, how long a worker may take to exit before it "
                                              "is killed")
    max_interruptions: int = option(3, "a running job found interrupted at start-up resumes from its last "
                                       "checkpoint; after this many interruptions it is marked failed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.blob_store not in BLOB_STORES:
            raise ValueError(f"--blob-store must be one of {', '.join(BLOB_STORES)}, got {self.blob_store!r}")
        if self.s3_part_size_mb < 5:
            raise ValueError(f"--s3-part-size-mb must be >= 5 (the S3 minimum part), got {self.s3_part_size_mb}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not self.devices:
            raise ValueError("--devices needs at least one device")
        for device in self.devices:
            if not _DEVICE.match(device):
                raise ValueError(f"--devices entries must be cpu, cuda or cuda:N, got {device!r}")
        for name in ("max_dataset_mb", "max_rank", "keep_checkpoints", "max_interruptions"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads < 0:
            raise ValueError(f"--torch-threads must be >= 0, got {self.torch_threads}")
        for name in ("registry_timeout_seconds", "cancel_grace_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if self.auth_cache_seconds < 0:
            raise ValueError(f"--auth-cache-seconds must be >= 0, got {self.auth_cache_seconds}")

    @property
    def effective_database_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'trainer.db').resolve()}"

    @property
    def max_dataset_bytes(self) -> int:
        return self.max_dataset_mb * 1024 * 1024
