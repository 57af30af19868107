"""Blob stores behind one interface: a local folder (embedded default) or S3/MinIO."""

from __future__ import annotations

from services.registry.blobstore.base import BlobInfo, BlobStore
from services.registry.blobstore.local import LocalBlobStore
from services.registry.blobstore.s3 import S3BlobStore
from services.registry.config import StateConfig

__all__ = ["BlobInfo", "BlobStore", "LocalBlobStore", "S3BlobStore", "open_blob_store"]


def open_blob_store(config: StateConfig) -> BlobStore:
    """The store the config names (not started yet)."""
    if config.blob_store == "s3":
        return S3BlobStore(config.s3_endpoint, config.s3_bucket, config.s3_access_key, config.s3_secret_key,
                           region=config.s3_region, secure=config.s3_secure,
                           part_size=config.s3_part_size_mb * 1024 * 1024)
    return LocalBlobStore(config.data_dir / "blobs")

