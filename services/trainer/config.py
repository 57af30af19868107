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
from typing import ClassVar

from services.common.config import ClientTlsConfig, option
from services.registry.config import StateConfig

DEFAULT_PORT = 50052
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"^(cpu|cuda(:\d+)?)$")


@dataclasses.dataclass(frozen=True)
class TrainerConfig(ClientTlsConfig, StateConfig):
    """loraplex Trainer: LoRA fine-tuning jobs published to the Registry."""

    sqlite_file: ClassVar[str] = "trainer.db"

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
    max_dataset_mb: int = option(512, "largest dataset upload, in MiB")
    max_rank: int = option(256, "largest LoRA rank a job may ask for (keep it equal to the Registry's --max-rank)")
    devices: list[str] = option(["cpu"], "training devices; one job runs on each at a time (cpu, cuda:0, ...)")
    dtype: str = option("auto", "base weights dtype while training: auto (float32 on cpu, bfloat16 on cuda), "
                                "float32, bfloat16 or float16; LoRA weights always train in float32")
    torch_threads: int = option(0, "CPU threads of each training worker (0: torch's default)")
    keep_checkpoints: int = option(2, "checkpoints kept per running job (older ones are deleted)")
    cancel_grace_seconds: float = option(5.0, "after a cancel, how long a worker may take to exit before it "
                                              "is killed")
    outage_wait_seconds: float = option(300.0, "how long a job waits, retrying with backoff, for its dataset "
                                               "store or the Registry to come back before it fails (0: fail at "
                                               "once); a finished training run waits this long to be published")
    max_interruptions: int = option(3, "a running job found interrupted at start-up resumes from its last "
                                       "checkpoint; after this many interruptions it is marked failed")

    def __post_init__(self) -> None:
        super().__post_init__()
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
        for name in ("auth_cache_seconds", "outage_wait_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    @property
    def max_dataset_bytes(self) -> int:
        return self.max_dataset_mb * 1024 * 1024
