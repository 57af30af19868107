"""Incomplete S3 multipart uploads made and inspected straight through minio, around our store.

minio's public API has no calls for them (see services/registry/blobstore/s3.py), so these use
its private wrappers of the S3 calls CreateMultipartUpload, UploadPart and ListMultipartUploads.
"""

from __future__ import annotations

from services.registry.blobstore import S3BlobStore


def leave_upload(store: S3BlobStore, key: str) -> str:
    """What an upload cut off by an S3 outage leaves: begun, one part sent, never completed nor aborted."""
    upload_id = store.client._create_multipart_upload(store.bucket, key, {})
    store.client._upload_part(store.bucket, key, b"part" * 1024, None, upload_id, 1)
    return upload_id


def incomplete_keys(store: S3BlobStore) -> list[str]:
    """The keys of every incomplete upload in the bucket, whatever their prefix, straight from S3."""
    return sorted(upload.object_name for upload in store.client._list_multipart_uploads(store.bucket).uploads)
