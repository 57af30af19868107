"""The trainer's domain objects: plain dataclasses (no SQL, no protobuf).

A `JobRecord` is both what the database holds and what the queue keeps live in memory while a
job runs; events carry copies (`snapshot`) so a watcher never sees a record change under it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from typing import Any

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
ACTIVE = frozenset({QUEUED, RUNNING})

def request_digest(request: Any, **extra: Any) -> str:
    """What a retry under the same request_id must repeat (StartJob, UploadDataset): every field
    of the `request` dataclass but the tenant and the key, which identify it, plus `extra`."""
    settings = {**dataclasses.asdict(request), **extra}
    del settings["tenant"], settings["request_id"]
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# Job event kinds (WatchJob).
SNAPSHOT, STATE_CHANGED, PROGRESS, EVAL = "snapshot", "state_changed", "progress", "eval"


@dataclasses.dataclass
class DatasetRecord:
    id: str
    tenant_id: str
    name: str
    format: str
    base_model: str
    max_seq_len: int
    longest_example: int
    num_examples: int
    size_bytes: int
    sha256: str
    blob_key: str
    created_at: dt.datetime
    # UploadDataset's idempotency key and a digest of the header and bytes (datasets.py), as
    # for jobs below.
    request_id: str | None = None
    request_digest: str = ""


@dataclasses.dataclass
class JobRecord:
    id: str
    tenant_id: str
    state: str
    base_model: str
    dataset_id: str
    lora: dict[str, Any]
    training: dict[str, Any]
    output_adapter_name: str
    deployment_name: str
    total_steps: int
    created_at: dt.datetime
    step: int = 0
    epoch: float = 0.0
    loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float = 0.0
    tokens_per_second: float = 0.0
    eta_seconds: float | None = None
    adapter_id: str = ""
    adapter_version: int = 0
    error: str = ""
    interruptions: int = 0
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    # StartJob's idempotency key (None when the caller gave none) and a digest of the request's
    # settings, to tell a retry from a different job reusing the key (jobs.py).
    request_id: str | None = None
    request_digest: str = ""
    # Live only, never stored: what a running job waits for (an outage, outage.py), else "".
    waiting_for: str = dataclasses.field(default="", metadata={"stored": False})

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL

    def snapshot(self) -> JobRecord:
        return dataclasses.replace(self)


# The Registry change kinds the trainer acts on (feed.py).
TENANT_DELETED = "TENANT_DELETED"
API_KEY_REVOKED = "API_KEY_REVOKED"


@dataclasses.dataclass(frozen=True)
class FeedEvent:
    """One message of the Registry's change feed, as the trainer sees it."""

    sequence: int
    kind: str = ""  # TENANT_DELETED, API_KEY_REVOKED, ... (the Registry's change kinds)
    tenant_id: str = ""
    subject: str = ""  # what changed: the key id of API_KEY_REVOKED
    is_position_marker: bool = False


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who calls: an operator (admin token) or one tenant (its API key, verified by the Registry)."""

    is_admin: bool
    tenant_id: str = ""
    tenant_name: str = ""

    def owns(self, tenant_id: str) -> bool:
        return self.is_admin or self.tenant_id == tenant_id


ADMIN = Principal(is_admin=True)
