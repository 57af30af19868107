"""Blobs as files in a folder: the embedded default.

A put places the bytes at `<root>/.tmp/<random>` (a hard link when the source is on the same
file system, so 100 MB of validated weights are not copied again; a copy otherwise), fsyncs
them, renames onto the final path (atomic on POSIX) and fsyncs the folder, so after a crash a
key either holds every byte or does not exist. Leftover temp files from a crash are swept by
`sweep_temp`.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from services.registry.blobstore.base import BlobInfo, IncompleteUpload, check_key

_TEMP = ".tmp"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalBlobStore:
    kind = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def start(self) -> None:
        (self.root / _TEMP).mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_file(self, key: str, path: Path) -> None:
        final = self._path(key)
        temp = self.root / _TEMP / uuid.uuid4().hex
        try:
            try:
                os.link(path, temp)  # same file system: publish the bytes without copying them
            except OSError:
                with open(path, "rb") as source, open(temp, "wb") as target:
                    shutil.copyfileobj(source, target, 4 * 1024 * 1024)
            fd = os.open(temp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, final)
            _fsync_dir(final.parent)
        finally:
            temp.unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise KeyError(key) from None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        base = self.root / check_key(prefix.rstrip("/"))
        if not base.is_dir():
            return
        for path in sorted(base.rglob("*")):
            if path.is_file():
                stat = path.stat()
                yield BlobInfo(path.relative_to(self.root).as_posix(), stat.st_size,
                               dt.datetime.fromtimestamp(stat.st_mtime, dt.timezone.utc))

    def incomplete_uploads(self, prefix: str) -> Iterator[IncompleteUpload]:
        """None: a put here is one file, and an interrupted one leaves a temp file (`sweep_temp`)."""
        return iter(())

    def abort_upload(self, upload: IncompleteUpload) -> bool:
        return True

    def sweep_temp(self, min_age_seconds: float) -> int:
        """Deletes temp files of interrupted puts older than `min_age_seconds`; returns bytes freed."""
        freed, cutoff = 0, time.time() - min_age_seconds
        for path in (self.root / _TEMP).glob("*"):
            stat = path.stat()
            if stat.st_mtime <= cutoff:
                path.unlink(missing_ok=True)
                freed += stat.st_size
        return freed

    def close(self) -> None:
        return None
