"""A blob store outage as callers answer it: UNAVAILABLE (retryable), saying what was done.

Shared by the Registry and the Trainer, which keep their blobs in the same kind of store:
stores raise BlobStoreUnavailable (base.py) and domain code wraps a block of store calls in
`store_down(outcome)`, so the one message format lives here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from services.common.errors import Unavailable
from services.registry.blobstore.base import BlobStoreUnavailable


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
