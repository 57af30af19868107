"""Adapter uploads: header checks, body spooling, validation, then blob and row.

Order of a successful upload, and why:
1. `begin_upload` checks the header, the tenant and the base model before the body arrives,
   so a wrong name fails fast.
2. `UploadBody` receives the chunks into a scratch folder, refusing bytes past --max-upload-mb
   at once (FILES bodies are split as they arrive, so weights are written once). A tenant key
   has at most a few uploads here at a time (services/common/upload_slots.py).
3. `finish_upload` validates everything (services/registry/validation) in a scratch folder.
4. The weights go to the blob store under their sha256 *before* the row commits; a crash
   between leaves an unreferenced blob that garbage collection removes, never a row
   without its blob.
5. The row commits under two locks: (tenant, name) makes version numbers unique (from the
   adapter_names counter, so a deleted version's number is never given again) and lets an
   identical concurrent upload find the first one's row (idempotency); the blob lock orders
   us against garbage collection, and under it we re-check that the blob is still there (GC
   may have removed an older identical orphan) before pointing a row at it.
Any failure removes the scratch files; nothing else was written. A blob store outage (at 4,
or at the re-check in 5) is UNAVAILABLE: no row was committed, and a blob already written is
an orphan that garbage collection removes, as after a crash.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import tempfile
import uuid
from pathlib import Path

from sqlalchemy import select

from services.common.errors import InvalidArgument, NotFound
from services.registry import feed
from services.registry.auth import Principal, scoped_tenant
from services.registry.base_models import fingerprint_of, load_base_model
from services.registry.blobstore.outage import store_down
from services.registry.context import RegistryContext, adapter_blob_key
from services.registry.db.models import Adapter, AdapterName, Tenant, utcnow
from services.registry.validation import (BaseModelRef, UploadLimits, UploadReceiver, ValidatedAdapter,
                                          check_files_header, validate_upload)

# Checked with fullmatch: `$` alone also matches before a trailing newline.
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
MAX_LABELS, MAX_LABEL_KEY, MAX_LABEL_VALUE, MAX_DESCRIPTION = 64, 63, 255, 4096


@dataclasses.dataclass(frozen=True)
class UploadHeader:
    tenant: str
    name: str
    base_model: str
    archive: str  # "zip", "files" or "" (unspecified)
    files: list[tuple[str, int]]
    override_base_model_check: bool = False
    content_sha256: str = ""
    description: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class UploadPlan:
    header: UploadHeader
    tenant_id: str
    base: BaseModelRef


def _check_header(header: UploadHeader, limits: UploadLimits) -> None:
    if not ADAPTER_NAME.fullmatch(header.name):
        raise InvalidArgument(f"adapter name {header.name!r} must be 1-63 characters of [A-Za-z0-9._-]",
                              reason="BAD_NAME", field="header.name", actual=header.name)
    if header.archive not in ("zip", "files"):
        raise InvalidArgument("header.archive must be ADAPTER_ARCHIVE_ZIP or ADAPTER_ARCHIVE_FILES",
                              reason="BAD_HEADER", field="header.archive")
    if header.archive == "files":
        check_files_header(header.files, limits)
    elif header.files:
        raise InvalidArgument("header.files is only for ADAPTER_ARCHIVE_FILES", reason="BAD_HEADER",
                              field="header.files")
    if header.content_sha256 and not SHA256_HEX.fullmatch(header.content_sha256):
        raise InvalidArgument("header.content_sha256 must be 64 lowercase hex characters", reason="BAD_HEADER",
                              field="header.content_sha256", actual=header.content_sha256)
    if len(header.description) > MAX_DESCRIPTION:
        raise InvalidArgument(f"header.description is longer than {MAX_DESCRIPTION} characters",
                              field="header.description")
    if len(header.labels) > MAX_LABELS or any(len(k) > MAX_LABEL_KEY or not k or len(v) > MAX_LABEL_VALUE
                                              for k, v in header.labels.items()):
        raise InvalidArgument(f"header.labels: at most {MAX_LABELS} labels, keys of 1-{MAX_LABEL_KEY} and values "
                              f"of at most {MAX_LABEL_VALUE} characters", field="header.labels")


def begin_upload(ctx: RegistryContext, principal: Principal, header: UploadHeader) -> UploadPlan:
    _check_header(header, ctx.limits)
    with ctx.db.read() as session:
        tenant = scoped_tenant(session, principal, header.tenant, field="header.tenant")
        base = load_base_model(session, header.base_model, field="header.base_model")
        return UploadPlan(header, tenant.id, BaseModelRef(base.name, base.location, fingerprint_of(base)))


class UploadBody:
    """The received bytes (see UploadReceiver) in a scratch folder of their own."""

    def __init__(self, spool_dir: Path, plan: UploadPlan, max_bytes: int) -> None:
        spool_dir.mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="upload-", dir=spool_dir))
        header = plan.header
        self.receiver = UploadReceiver(self.workdir, header.archive, header.files, max_bytes,
                                       hash_body=bool(header.content_sha256))

    def write(self, chunk: bytes) -> None:
        self.receiver.write(chunk)

    def discard(self) -> None:
        self.receiver.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def finish_upload(ctx: RegistryContext, plan: UploadPlan, body: UploadBody) -> tuple[Adapter, bool]:
    """Validates the received body and stores it; (row, created). Always discards the scratch folder."""
    try:
        received_sha = body.receiver.close()
        header = plan.header
        if body.receiver.size == 0:
            raise InvalidArgument("upload has a header but no bytes", reason="EMPTY_UPLOAD")
        if header.content_sha256 and header.content_sha256 != received_sha:
            raise InvalidArgument("header.content_sha256 does not match the bytes received",
                                  reason="CONTENT_SHA256_MISMATCH", field="header.content_sha256",
                                  expected=header.content_sha256, actual=received_sha)
        unpacked = body.receiver.unpack(ctx.limits)
        validated = validate_upload(unpacked, plan.base, ctx.limits, header.override_base_model_check)
        with store_down(f"adapter '{header.name}' was validated but not stored (no version was created); "
                        "its scratch files were removed"):
            return _store(ctx, plan, validated)
    finally:
        body.discard()


def _find_identical(session, plan: UploadPlan, validated: ValidatedAdapter) -> Adapter | None:
    return session.scalar(select(Adapter).where(
        Adapter.tenant_id == plan.tenant_id, Adapter.name == plan.header.name,
        Adapter.base_model == plan.base.name, Adapter.content_digest == validated.content_digest))


def _store(ctx: RegistryContext, plan: UploadPlan, validated: ValidatedAdapter) -> tuple[Adapter, bool]:
    with ctx.db.read() as session:  # fast path for a re-upload: no blob write at all
        existing = _find_identical(session, plan, validated)
        if existing is not None:
            return existing, False
    key = adapter_blob_key(validated.sha256)
    if not ctx.store.exists(key):
        ctx.store.put_file(key, validated.weights_path)
    header, spec = plan.header, validated.spec
    with ctx.db.write() as session:
        ctx.db.lock(session, "adapter", plan.tenant_id, header.name)
        ctx.db.lock(session, "blob", validated.sha256)
        existing = _find_identical(session, plan, validated)
        if existing is not None:
            return existing, False
        # FOR SHARE (PostgreSQL; SQLite writers never overlap): a DeleteTenant holding the row makes
        # us wait and then see it gone, NOT_FOUND, instead of failing the foreign key as INTERNAL.
        if session.get(Tenant, plan.tenant_id, with_for_update={"read": True}) is None:
            raise NotFound(f"tenant '{header.tenant or plan.tenant_id}' not found", reason="TENANT_NOT_FOUND")
        if not ctx.store.exists(key):  # collected as an orphan since we wrote it: write it again
            ctx.store.put_file(key, validated.weights_path)
        counter = session.get(AdapterName, (plan.tenant_id, header.name))
        if counter is None:
            counter = AdapterName(tenant_id=plan.tenant_id, name=header.name, last_version=0)
            session.add(counter)
        counter.last_version += 1  # never max(version) + 1: a deleted version's number is not reused
        row = Adapter(id="adp_" + uuid.uuid4().hex, tenant_id=plan.tenant_id, name=header.name,
                      version=counter.last_version,
                      base_model=plan.base.name, rank=validated.rank, alpha=spec.alpha, use_rslora=spec.use_rslora,
                      scaling=validated.scaling, target_modules=validated.target_modules,
                      size_bytes=validated.size_bytes, sha256=validated.sha256,
                      content_digest=validated.content_digest, config_json=spec.normalized_json,
                      description=header.description, labels=dict(header.labels), created_at=utcnow())
        session.add(row)
        feed.record(ctx, session, feed.ADAPTER_CREATED, plan.tenant_id, row.id)
    return row, True
