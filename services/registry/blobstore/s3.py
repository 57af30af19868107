"""Blobs in S3 or MinIO through the `minio` client.

The bucket is created at start when missing. `put_file` hands minio a part size, so objects
above it go up as multipart uploads (parts in parallel are minio's business); a PUT or a
completed multipart upload is atomic in S3, so readers never see a partial object, and an
interrupted multipart upload leaves no visible object. It does leave its parts, holding storage,
when minio's own abort fails too (the endpoint went down mid-upload): `incomplete_uploads` and
`abort_upload` let garbage collection find and abort such uploads (gc.py).

Failures of the endpoint itself (connection refused, reset, timed out, a 5xx) become
BlobStoreUnavailable in `_translated`, the one place that knows minio's and urllib3's error
types; S3 answers about objects (NoSuchKey, AccessDenied) keep their meaning. minio's own
HTTP client waits 5 minutes to connect and 5 minutes per read and retries 5 times, honouring
any Retry-After: a down endpoint could hold an RPC (and a worker thread) for half an hour.
We hand minio a client with bounded limits instead (see `_http_client`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import certifi
import urllib3
from minio import Minio
from minio.error import InvalidResponseError, S3Error, ServerError
from urllib3.exceptions import HTTPError

from services.registry.blobstore.base import BlobInfo, BlobStoreUnavailable, IncompleteUpload, check_key

log = logging.getLogger("loraplex.registry.blobstore.s3")
_MISSING = ("NoSuchKey", "NoSuchObject", "ResourceNotFound")
#: A healthy endpoint accepts a connection in milliseconds; 5 s allows for a slow network.
CONNECT_TIMEOUT_S = 5.0
#: The longest silence between two reads of one response. Not the time a transfer may take
#: (a 1 GB object streams for longer); S3 and MinIO answer well within this when healthy.
READ_TIMEOUT_S = 30.0
#: Tries after the first, for connection errors, idempotent reads and 500/502/503/504, with
#: 0, 0.4 and 0.8 s between them. So a refused connection fails in about a second, a
#: black-holed endpoint in about (1 + RETRIES) x CONNECT_TIMEOUT_S = 20 s.
RETRIES = 3


def _http_client(connect_timeout: float, read_timeout: float, retries: int) -> urllib3.PoolManager:
    """minio's default client (same pool size and certificates), with bounded timeouts and retries."""
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout, read=read_timeout), maxsize=10,
        cert_reqs="CERT_REQUIRED", ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        # No Retry-After: a 503 asking for an hour would otherwise sleep the worker for an hour.
        retries=urllib3.Retry(total=retries, backoff_factor=0.2, status_forcelist=[500, 502, 503, 504],
                              respect_retry_after_header=False))


def _endpoint_failure(exc: Exception) -> str | None:
    """Why the endpoint (not an object) failed, or None when `exc` is an answer about an object."""
    if isinstance(exc, HTTPError):  # refused, reset, timed out, retries of 5xx exhausted
        return str(getattr(exc, "reason", None) or exc)
    if isinstance(exc, ServerError) or (isinstance(exc, InvalidResponseError) and getattr(exc, "_code", 0) >= 500):
        return str(exc)  # a 5xx without an S3 error body (a proxy's error page, say)
    if isinstance(exc, S3Error) and getattr(exc.response, "status", 0) >= 500:  # InternalError, SlowDown
        return f"{exc.code}: {exc.message}"
    return None


class _ObjectReader:
    """File-like view of a GET response that returns its connection to the pool on close."""

    def __init__(self, response, translated) -> None:
        self._response, self._translated = response, translated

    def read(self, size: int = -1) -> bytes:
        with self._translated():  # the connection may drop mid-object
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
                 secure: bool, part_size: int, connect_timeout: float = CONNECT_TIMEOUT_S,
                 read_timeout: float = READ_TIMEOUT_S, retries: int = RETRIES) -> None:
        self.client = Minio(endpoint, access_key=access_key or None, secret_key=secret_key or None,
                            secure=secure, region=region,
                            http_client=_http_client(connect_timeout, read_timeout, retries))
        self.endpoint, self.bucket, self.part_size = endpoint, bucket, part_size

    @contextlib.contextmanager
    def _translated(self):
        """Turns a failure of the endpoint into BlobStoreUnavailable; answers about objects pass."""
        try:
            yield
        except (HTTPError, InvalidResponseError, ServerError, S3Error) as exc:
            cause = _endpoint_failure(exc)
            if cause is None:
                raise
            raise BlobStoreUnavailable(self.endpoint, cause) from None

    def start(self) -> None:
        with self._translated():
            if not self.client.bucket_exists(self.bucket):
                try:
                    self.client.make_bucket(self.bucket)
                except S3Error as exc:  # another registry process created it first
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    def put_file(self, key: str, path: Path) -> None:
        with self._translated():
            self.client.fput_object(self.bucket, check_key(key), str(path), part_size=self.part_size)

    def exists(self, key: str) -> bool:
        with self._translated():
            try:
                self.client.stat_object(self.bucket, check_key(key))
                return True
            except S3Error as exc:
                if exc.code in _MISSING:
                    return False
                raise

    def open(self, key: str) -> BinaryIO:
        with self._translated():
            try:
                response = self.client.get_object(self.bucket, check_key(key))
            except S3Error as exc:
                if exc.code in _MISSING:
                    raise KeyError(key) from None
                raise
        return _ObjectReader(response, self._translated)  # type: ignore[return-value]

    def delete(self, key: str) -> None:
        with self._translated():
            self.client.remove_object(self.bucket, check_key(key))

    def list(self, prefix: str) -> Iterator[BlobInfo]:
        with self._translated():  # list_objects is lazy: each page is fetched while we iterate
            for item in self.client.list_objects(self.bucket, prefix=check_key(prefix.rstrip("/")) + "/",
                                                 recursive=True):
                modified = item.last_modified or dt.datetime.now(dt.timezone.utc)
                yield BlobInfo(item.object_name, item.size or 0, modified.astimezone(dt.timezone.utc))

    # minio 7 has no public call for incomplete uploads (7.0 removed list_incomplete_uploads and
    # remove_incomplete_upload), so the next two use its private `_list_multipart_uploads` and
    # `_abort_multipart_upload`: thin wrappers of the documented S3 calls ListMultipartUploads and
    # AbortMultipartUpload that keep minio's request signing and our bounded HTTP client.
    # test_blob_stores.py runs both against moto, so a minio upgrade that changes them fails there.
    # The public alternative, a bucket lifecycle rule (AbortIncompleteMultipartUpload), would
    # replace the bucket's whole lifecycle configuration, which the Trainer and operators share.

    def incomplete_uploads(self, prefix: str) -> Iterator[IncompleteUpload]:
        scope = check_key(prefix.rstrip("/")) + "/"
        key_marker = upload_marker = None
        with self._translated():  # each page is fetched while we iterate
            while True:
                try:
                    page = self.client._list_multipart_uploads(self.bucket, prefix=scope, key_marker=key_marker,
                                                               upload_id_marker=upload_marker)
                except S3Error as exc:
                    if exc.code != "AccessDenied":
                        raise
                    # Credentials scoped before this existed: garbage collection must go on without it.
                    log.warning("cannot list incomplete uploads in bucket %s (AccessDenied): grant "
                                "s3:ListBucketMultipartUploads and s3:AbortMultipartUpload to have them aborted",
                                self.bucket)
                    return
                for upload in page.uploads:
                    # Checked here too: a server that ignored `prefix` must not hand us (and so the
                    # collector) the uploads of another prefix of a shared bucket.
                    if upload.object_name.startswith(scope) and upload.upload_id:
                        # No date reads as "just begun": an upload is never aborted on a guess.
                        initiated = upload.initiated_time or dt.datetime.now(dt.timezone.utc)
                        yield IncompleteUpload(upload.object_name, upload.upload_id,
                                               initiated.astimezone(dt.timezone.utc))
                if not page.is_truncated or not page.uploads:
                    return
                # The next page starts after the last upload listed (what S3's NextKeyMarker and
                # NextUploadIdMarker say; minio 7.2.20 stores the latter under a misspelt attribute).
                key_marker, upload_marker = page.uploads[-1].object_name, page.uploads[-1].upload_id

    def abort_upload(self, upload: IncompleteUpload) -> bool:
        with self._translated():
            try:
                self.client._abort_multipart_upload(self.bucket, check_key(upload.key), upload.upload_id)
            except S3Error as exc:
                if exc.code == "AccessDenied":  # as for the listing: logged, and collection goes on
                    log.warning("cannot abort the incomplete upload %s of %s (AccessDenied): grant "
                                "s3:AbortMultipartUpload to have it aborted", upload.upload_id, upload.key)
                    return False
                if exc.code != "NoSuchUpload":  # completed or aborted since it was listed: nothing to free
                    raise
        return True

    def read_object(self, bucket: str, key: str, max_bytes: int) -> bytes:
        """Reads a small object from any bucket of this endpoint (a base model's config.json).

        KeyError: no such object (or no access to it). BlobStoreUnavailable: the endpoint did not
        answer or failed, which says nothing about the object, so callers can tell the two apart.
        """
        with self._translated():
            try:
                response = self.client.get_object(bucket, key)
            except S3Error as exc:
                if _endpoint_failure(exc) is not None:
                    raise
                raise KeyError(f"s3://{bucket}/{key}: {exc.code}") from None
            with _ObjectReader(response, self._translated) as reader:
                data = reader.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ValueError(f"s3://{bucket}/{key} is larger than {max_bytes} bytes")
        return data

    def presigned_url(self, key: str, expires_seconds: int) -> str:
        """A GET URL valid for `expires_seconds` (used by the benchmark to compare paths)."""
        return self.client.presigned_get_object(self.bucket, check_key(key),
                                                expires=dt.timedelta(seconds=expires_seconds))

    def close(self) -> None:
        return None
