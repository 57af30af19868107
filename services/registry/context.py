"""What every domain call needs: the database, the blob store, limits and the feed notifier.

Built once by the app from RegistryConfig; domain functions take it as their first argument
so they stay plain functions (easy to call from tests, tools and the benchmark).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from services.registry.blobstore import BlobStore
from services.registry.db import Database
from services.registry.feed_notifier import FeedNotifier
from services.registry.validation import UploadLimits

#: Blob key prefix of adapter weights; the rest of the key is the sha256 (content address).
ADAPTER_BLOB_PREFIX = "adapters"


def adapter_blob_key(sha256: str) -> str:
    return f"{ADAPTER_BLOB_PREFIX}/{sha256}"


@dataclasses.dataclass
class RegistryContext:
    db: Database
    store: BlobStore
    limits: UploadLimits
    admin_token: str
    #: Where upload bodies and unpacked weights wait while they are validated.
    spool_dir: Path
    notifier: FeedNotifier
    change_retention: dt.timedelta
    watch_poll_seconds: float
    #: Incomplete multipart uploads of adapter blobs begun longer ago are aborted by GC (gc.py).
    stale_upload_age: dt.timedelta

