"""Domain rows <-> protobuf messages. No logic beyond field mapping lives here."""

from __future__ import annotations

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.common.v1 import model_pb2
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.timestamps import timestamp
from services.registry import feed
from services.registry.db import models
from services.registry.uploads import UploadHeader

_ARCHIVES = {pb.ADAPTER_ARCHIVE_ZIP: "zip", pb.ADAPTER_ARCHIVE_FILES: "files"}
_KIND_PREFIX = "CHANGE_KIND_"


def tenant(row: models.Tenant) -> pb.Tenant:
    return pb.Tenant(id=row.id, name=row.name, display_name=row.display_name, created_at=timestamp(row.created_at))


def api_key(row: models.ApiKey) -> pb.ApiKey:
    return pb.ApiKey(id=row.id, tenant_id=row.tenant_id, name=row.name, prefix=row.prefix,
                     created_at=timestamp(row.created_at), expires_at=timestamp(row.expires_at),
                     revoked_at=timestamp(row.revoked_at))


def fingerprint(data: dict) -> model_pb2.ArchitectureFingerprint:
    modules = [model_pb2.ModuleShape(**shape) for shape in data["modules"]]
    return model_pb2.ArchitectureFingerprint(**{**data, "modules": modules})


def base_model(row: models.BaseModel) -> pb.BaseModel:
    return pb.BaseModel(name=row.name, location=row.location, description=row.description,
                        fingerprint=fingerprint(row.fingerprint), created_at=timestamp(row.created_at))


def adapter(row: models.Adapter) -> pb.Adapter:
    return pb.Adapter(id=row.id, tenant_id=row.tenant_id, name=row.name, version=row.version,
                      base_model=row.base_model, rank=row.rank, alpha=row.alpha, use_rslora=row.use_rslora,
                      target_modules=list(row.target_modules), size_bytes=row.size_bytes, sha256=row.sha256,
                      description=row.description, labels=dict(row.labels), created_at=timestamp(row.created_at),
                      scaling=row.scaling)


def deployment(row: models.Deployment) -> pb.Deployment:
    return pb.Deployment(name=row.name, tenant_id=row.tenant_id, base_model=row.base_model,
                         adapter_name=row.adapter_name, adapter_version=row.adapter_version,
                         created_at=timestamp(row.created_at), updated_at=timestamp(row.updated_at))


def change_event(event: feed.FeedEvent) -> pb.ChangeEvent:
    kind = pb.ChangeKind.Value(_KIND_PREFIX + event.kind) if event.kind else pb.CHANGE_KIND_UNSPECIFIED
    return pb.ChangeEvent(sequence=event.sequence, kind=kind, tenant_id=event.tenant_id, subject=event.subject,
                          created_at=timestamp(event.created_at), is_position_marker=event.is_position_marker)


def change_kinds(kinds) -> list[str]:
    names = []
    for kind in kinds:
        if kind == pb.CHANGE_KIND_UNSPECIFIED or kind not in pb.ChangeKind.values():
            raise InvalidArgument(f"kinds holds an invalid change kind ({kind})", field="kinds")
        names.append(pb.ChangeKind.Name(kind).removeprefix(_KIND_PREFIX))
    return names


def upload_header(header: pb.UploadAdapterHeader) -> UploadHeader:
    return UploadHeader(tenant=header.tenant, name=header.name, base_model=header.base_model,
                        archive=_ARCHIVES.get(header.archive, ""),
                        files=[(f.filename, f.size_bytes) for f in header.files],
                        override_base_model_check=header.override_base_model_check,
                        content_sha256=header.content_sha256, description=header.description,
                        labels=dict(header.labels))
