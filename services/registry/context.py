"""What every domain call needs: the database, the blob store, limits and the feed notifier.

Built once by the app from RegistryConfig; domain functions take it as their first argument
so they stay plain functions (easy to call from tests, tools and the benchmark).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
from collections.abc import Callable, Iterator
from pathlib import Path

from services.common.errors import Unavailable
from services.registry.blobstore import BlobStore
from services.registry.blobstore.base import BlobStoreUnavailable
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


def store_unavailable(exc: BlobStoreUnavailable, outcome: str, **metadata: object) -> Unavailable:
    """The one mapping of a blob store outage to UNAVAILABLE (retryable). `outcome` says what
    the call did and did not do, so the caller knows what a retry repeats."""
    return Unavailable(f"the blob store is down ({exc}); {outcome}; retry later", reason="BLOB_STORE_UNAVAILABLE",
                       endpoint=exc.endpoint, **metadata)


@contextlib.contextmanager
def store_down(outcome: str | Callable[[], str], **metadata: object) -> Iterator[None]:
    """Runs a block of blob store calls; an outage becomes `store_unavailable(outcome)`.
    `outcome` may be a function, for blocks whose progress changes what was done."""
    try:
        yield
    except BlobStoreUnavailable as exc:
        raise store_unavailable(exc, outcome() if callable(outcome) else outcome, **metadata) from None
