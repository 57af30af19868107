"""Datasets: streamed in, validated whole, then stored (blob first, row second).

Order of an upload, and why:
1. The header is checked (tenant, name, format, base model, max_seq_len) before any byte.
2. Chunks are spooled to `<data-dir>/spool` while counted (--max-dataset-mb) and hashed, at
   most a few uploads per tenant at a time (services/common/upload_slots.py).
3. Every line is validated (validation.py) with the base model's tokenizer.
4. The file goes to the blob store, then the row commits; if the row fails the blob is removed.
Any failure deletes the spool file: nothing half-written is left and nothing is stored.

A `request_id` makes an upload safe to retry after a lost answer: the tenant's dataset stored
under that key is returned (checked against a digest of the header and the bytes, so a key
reused for other data is refused) and nothing new is stored. The bytes are read either way: a
retry is only recognised as one by its content, and validation is skipped for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.registry import paging
from services.registry.blobstore import BlobStore
from services.registry.blobstore.base import BlobStoreUnavailable
from services.registry.blobstore.outage import store_down
from services.trainer.auth import Authenticator
from services.trainer.base_models import BaseModels
from services.trainer.blobs import dataset_key
from services.trainer.db.models import utcnow
from services.trainer.examples import FORMATS
from services.common.fields import check_request_id, require
from services.common.upload_slots import UploadSlots
from services.trainer.records import DatasetRecord, Principal, request_digest
from services.trainer.store import TrainerStore
from services.trainer.validation import AUTO, validate_jsonl

log = logging.getLogger("loraplex.trainer.datasets")
DEFAULT_MAX_SEQ_LEN = 1024
MAX_NAME = 255


@dataclasses.dataclass(frozen=True)
class DatasetHeader:
    tenant: str
    name: str
    format: str  # auto | chat | prompt_completion
    base_model: str
    max_seq_len: int  # 0 = default
    request_id: str = ""

    def digest(self, sha256: str) -> str:
        return request_digest(self, sha256=sha256)  # the header's settings and the bytes


class _Spool:
    """The upload body on disk, counted and hashed as it arrives."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(prefix="dataset-", suffix=".jsonl", dir=folder)
        self.path, self.max_bytes = Path(name), max_bytes
        self._file = open(handle, "wb")
        self._hash, self.size = hashlib.sha256(), 0

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise InvalidArgument(f"dataset is larger than this trainer's limit of {self.max_bytes} bytes "
                                  "(--max-dataset-mb)", reason="DATASET_TOO_LARGE", field="chunk")
        self._hash.update(chunk)
        self._file.write(chunk)

    def finish(self) -> str:
        self._file.close()
        return self._hash.hexdigest()

    def discard(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _same_upload(earlier: DatasetRecord, header: DatasetHeader, digest: str) -> DatasetRecord:
    if earlier.request_digest != digest:
        raise AlreadyExists(f"request_id '{header.request_id}' already stored dataset '{earlier.id}' with another "
                            "header or other bytes; use a new request_id for a different dataset",
                            reason="REQUEST_ID_REUSED", field="header.request_id")
    return earlier


class DatasetService:
    def __init__(self, store: TrainerStore, blobs: BlobStore, models: BaseModels, auth: Authenticator,
                 run: Callable[..., Awaitable], spool_dir: Path, max_bytes: int) -> None:
        self.store, self.blobs, self.models, self.auth = store, blobs, models, auth
        self.run, self.spool_dir, self.max_bytes = run, spool_dir, max_bytes
        self.upload_slots = UploadSlots()

    async def upload(self, principal: Principal, header: DatasetHeader, chunks: AsyncIterator[bytes]) -> DatasetRecord:
        tenant_id = await self.auth.tenant(principal, header.tenant, field="header.tenant")
        if header.request_id:
            check_request_id(header.request_id, "header.request_id")
        if not header.name or len(header.name) > MAX_NAME:
            raise InvalidArgument(f"header.name must be 1-{MAX_NAME} characters", reason="BAD_NAME",
                                  field="header.name")
        if header.format not in (AUTO, *FORMATS):
            raise InvalidArgument("header.format must be AUTO, CHAT or PROMPT_COMPLETION", field="header.format")
        base = await self.models.get(header.base_model, field="header.base_model")
        limit = base.max_position_embeddings
        max_seq_len = header.max_seq_len or min(DEFAULT_MAX_SEQ_LEN, limit)
        if not 1 <= max_seq_len <= limit:
            raise InvalidArgument(f"header.max_seq_len must be in [1, {limit}] (the base model's context), got "
                                  f"{max_seq_len}", field="header.max_seq_len")
        async with self.upload_slots.hold("" if principal.is_admin else tenant_id):  # the spool disk is shared
            spool = _Spool(self.spool_dir, self.max_bytes)
            try:
                async for chunk in chunks:
                    spool.write(chunk)
                sha256 = spool.finish()
                if spool.size == 0:
                    raise InvalidArgument("the upload has a header but no bytes", reason="EMPTY_DATASET", field="chunk")
                digest = header.digest(sha256)
                if header.request_id:
                    earlier = await self.run(self.store.dataset_for_request, tenant_id, header.request_id)
                    if earlier is not None:
                        return _same_upload(earlier, header, digest)
                tokenizer = await self.run(self.models.tokenizer, base)
                summary = await self.run(validate_jsonl, spool.path, header.format, tokenizer, max_seq_len)
                dataset_id = "ds_" + uuid.uuid4().hex
                record = DatasetRecord(id=dataset_id, tenant_id=tenant_id, name=header.name, format=summary.format,
                                       base_model=base.name, max_seq_len=max_seq_len,
                                       longest_example=summary.longest_example, num_examples=summary.num_examples,
                                       size_bytes=spool.size, sha256=sha256,
                                       blob_key=dataset_key(tenant_id, dataset_id), created_at=utcnow(),
                                       request_id=header.request_id or None, request_digest=digest)
                with store_down(f"dataset '{header.name}' was validated but not stored (no dataset was created)"):
                    stored = await self.run(self._persist, record, spool.path)
            finally:
                spool.discard()
        if stored.id != record.id:  # a concurrent upload with the same request_id stored its dataset first
            return _same_upload(stored, header, digest)
        log.info("dataset %s (%s, %d examples) stored for tenant %s", record.id, record.format, record.num_examples,
                 tenant_id)
        return record

    def _persist(self, record: DatasetRecord, path: Path) -> DatasetRecord:
        self.blobs.put_file(record.blob_key, path)
        try:
            stored = self.store.insert_dataset(record, tenant_field="header.tenant")
        except BaseException:
            self.blobs.delete(record.blob_key)
            raise
        if stored.id != record.id:  # a concurrent retry's dataset was stored: these bytes are a copy
            self.blobs.delete(record.blob_key)
        return stored

    async def get(self, principal: Principal, dataset_id: str) -> DatasetRecord:
        require(dataset_id, "id")
        record = await self.run(self.store.get_dataset, dataset_id)
        if record is None or not principal.owns(record.tenant_id):
            raise NotFound(f"dataset '{dataset_id}' not found", reason="DATASET_NOT_FOUND", field="id")
        return record

    async def list(self, principal: Principal, tenant: str, page: paging.Page) -> tuple[list[DatasetRecord], str]:
        tenant_id = await self.auth.tenant_filter(principal, tenant)
        return await self.run(self.store.list_datasets, tenant_id, page)

    async def delete(self, principal: Principal, dataset_id: str) -> None:
        require(dataset_id, "id")
        owner = None if principal.is_admin else principal.tenant_id
        record = await self.run(self.store.delete_dataset, dataset_id, owner)
        try:
            await self.run(self.blobs.delete, record.blob_key)
        except BlobStoreUnavailable as exc:
            # The row is gone (the dataset is deleted for every caller); its bytes are swept once
            # the store is back (orphans.py).
            log.warning("dataset %s deleted; its blob %s stays until the store is back: %s", record.id,
                        record.blob_key, exc)

    def read_into(self, record: DatasetRecord, target: Path) -> None:
        """Copies a dataset's bytes to `target`, checking its sha256 (blocking)."""
        digest = hashlib.sha256()
        try:
            source = self.blobs.open(record.blob_key)
        except KeyError:
            raise NotFound(f"dataset '{record.id}' has no stored bytes (blob {record.blob_key} is missing)",
                           reason="DATASET_BLOB_MISSING") from None
        try:
            with open(target, "wb") as out:
                while chunk := source.read(1024 * 1024):
                    digest.update(chunk)
                    out.write(chunk)
        finally:
            source.close()
        if digest.hexdigest() != record.sha256:
            raise InvalidArgument(f"dataset '{record.id}' is corrupted in the blob store (sha256 mismatch)",
                                  reason="DATASET_CORRUPTED")
