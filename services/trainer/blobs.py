"""Dataset storage through the Registry's blob store implementations (local folder or S3).

Keys are `datasets/<tenant>/<dataset>.jsonl` (ids lowercased, `_` -> `-`, as blob keys allow
only [a-z0-9._-]): per-tenant prefixes for operators and lifecycle rules; the SQL row is what
scopes access. The Registry's garbage collector only looks under `adapters/`, so one bucket
can hold both.
"""

from __future__ import annotations

import re

from services.registry.blobstore import BlobStore, open_blob_store
from services.trainer.config import TrainerConfig

DATASET_PREFIX = "datasets"


def open_dataset_store(config: TrainerConfig) -> BlobStore:
    """The store the config names (not started yet): the Registry's factory, same settings."""
    return open_blob_store(config)


def _key_part(identifier: str) -> str:
    return re.sub(r"[^a-z0-9.-]", "-", identifier.lower())


def tenant_prefix(tenant_id: str) -> str:
    return f"{DATASET_PREFIX}/{_key_part(tenant_id)}"


def dataset_key(tenant_id: str, dataset_id: str) -> str:
    return f"{tenant_prefix(tenant_id)}/{_key_part(dataset_id)}.jsonl"
