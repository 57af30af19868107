"""Blobs in S3 or MinIO through the `minio` client.

The bucket is created at start when missing. `put_file` hands minio a part size, so objects
above it go up as multipart uploads (parts in parallel are minio's business); a PUT or a
completed multipart upload is atomic in S3, so readers never see a partial object, and an
interrupted multipart upload leaves no visible object.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from minio import Minio
from minio.error import S3Error, ServerError
from urllib3.exceptions import HTTPError

from services.registry.blobstore.base import BlobInfo, check_key

_MISSING = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")


class _ObjectReader:
    """File-like view of a GET response that returns its connection to the pool on close."""

    def __init__(self, response) -> None:
        self._response = response

    def read(self, size: int = -1) -> bytes:
        return self._response.read(None if size < 0 else size)

    def close(self) -> None:
        self._response.close()
        self._response.release_conn()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class S3BlobStore:
    kind = "s3"

    def __init__(self, endpoint: str, bucket: str, access_key: str, secret_key: str, *, region: str,
                 secure: bool, part_size: int) -> None:
        self.client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                            secure=secure, region=region)
        self.endpoint, self.bucket, self.part_size = endpoint, bucket, part_size

    def start(self) -> None:
        if not self.client.bucket_exists(self.bucket):
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:  # another registry process created it first
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

    def put_file(self, key: str, path: Path) -> None:
        self.client.fput_object(self.bucket, check_key(key), str(path), part_size=self.part_size)

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, check_key(key))
            return True
        except S3Error as exc:
            if exc.code in _MISSING:
                return False
            raise

    def open(self, key: str) -> BinaryIO:
        try:
            return _ObjectReader(self.client.get_object(self.bucket, check_key(key)))  # type: ignore[return-value]
        except S3Error as exc:
            if exc.code in _MISSING:
                raise KeyError(key) from None
            raise

    def delete(self, key: str) -> None:
        self.client.remove_object(self.bucket, check_key(key))

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        for item in self.client.list_objects(self.bucket, prefix=check_key(prefix.rstrip("/")) + "/", recursive=True):
            modified = item.last_modified or dt.datetime.now(dt.timezone.utc)
            yield BlobInfo(item.object_name, item.size or 0, modified.astimezone(dt.timezone.utc))

    def read_object(self, bucket: str, key: str, max_bytes: int) -> bytes:
        """Reads a small object from any bucket of this endpoint (a base model's config.json).

        KeyError: no such object. ConnectionError: the endpoint did not answer or failed (after
        minio's own retries), which says nothing about the object, so callers can tell the two apart.
        """
        try:
            response = self.client.get_object(bucket, key)
            with _ObjectReader(response) as reader:
                data = reader.read(max_bytes + 1)
        except S3Error as exc:
            raise KeyError(f"s3://{bucket}/{key}: {exc.code}") from None
        except (HTTPError, ServerError) as exc:  # connection refused, reset, timeout; 5xx without an S3 body
            cause = getattr(exc, "reason", None) or exc
            raise ConnectionError(f"S3 endpoint {self.endpoint} is unreachable or failing "
                                  f"({str(cause)[:200]})") from None
        if len(data) > max_bytes:
            raise ValueError(f"s3://{bucket}/{key} is larger than {max_bytes} bytes")
        return data

    def presigned_url(self, key: str, expires_seconds: int) -> str:
        """A GET URL valid for `expires_seconds` (used by the benchmark to compare paths)."""
        return self.client.presigned_get_object(self.bucket, check_key(key),
                                                expires=dt.timedelta(seconds=expires_seconds))

    def close(self) -> None:
        return None
