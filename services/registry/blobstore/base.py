"""The blob store interface: immutable objects under string keys.

The Registry keys adapter weights by content (`adapters/<sha256>`), so a key's bytes never
change: a put of an existing key may be skipped, and readers never see a half-written
object (both stores publish atomically). Everything is synchronous; the servicer calls it
from a thread pool.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

# Our own keys only: lowercase words separated by "/", no "..", no leading "/".
_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")


def check_key(key: str) -> str:
    if not _KEY.match(key) or ".." in key:
        raise ValueError(f"invalid blob key {key!r}")
    return key


class BlobStoreUnavailable(ConnectionError):
    """The store did not answer or failed (refused, reset, timed out, a 5xx), after the
    client's own bounded retries.

    It says nothing about the object, unlike KeyError, so a caller must not read it as
    "missing": the same call may succeed once the store is back. Stores raise only this for
    such failures (one translation point per store), and callers map it to UNAVAILABLE in
    one place (outage.py, `store_down`). A ConnectionError, so code
    that already catches those keeps working.
    """

    def __init__(self, endpoint: str, cause: str) -> None:
        super().__init__(f"S3 endpoint {endpoint} is unreachable or failing ({cause[:200]})")
        self.endpoint = endpoint


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    key: str
    size: int
    modified_at: dt.datetime  # UTC


@dataclasses.dataclass(frozen=True)
class IncompleteUpload:
    """An S3 multipart upload begun and neither completed nor aborted. It shows no object (so
    `list` never sees it), but the parts sent so far hold storage until it is aborted."""

    key: str
    upload_id: str
    initiated_at: dt.datetime  # UTC


class BlobStore(Protocol):
    """What the Registry needs from an object store."""

    #: "local" or "s3", for logs and benchmarks.
    kind: str

    def start(self) -> None:
        """Prepares the store (creates the folder or bucket)."""

    def put_file(self, key: str, path: Path) -> None:
        """Stores the file's bytes under `key`, atomically: readers see all of it or nothing.

        The store may keep a hard link to `path`: the caller may delete the file afterwards but
        must never modify it in place.
        """

    def exists(self, key: str) -> bool: ...

    def open(self, key: str) -> BinaryIO:
        """A reader of the object (`read(n)`, `close()`); KeyError if it does not exist.

        Any method, and the reader's `read`, may raise BlobStoreUnavailable (remote stores).
        """

    def delete(self, key: str) -> None:
        """Removes the object; a missing object is not an error."""

    def list(self, prefix: str) -> Iterator[BlobInfo]: ...

    def incomplete_uploads(self, prefix: str) -> Iterator[IncompleteUpload]:
        """Multipart uploads under `prefix` never completed nor aborted (the local store has none)."""

    def abort_upload(self, upload: IncompleteUpload) -> bool:
        """Aborts the upload, freeing its parts; one completed or aborted meanwhile is not an error.
        False when the store refused (credentials without the permission): logged, not raised."""

    def close(self) -> None: ...
