import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from services.common.pb.loraplex.common.v1 import generation_pb2 as _generation_pb2
from services.common.pb.loraplex.common.v1 import model_pb2 as _model_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AdapterArchive(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADAPTER_ARCHIVE_UNSPECIFIED: _ClassVar[AdapterArchive]
    ADAPTER_ARCHIVE_ZIP: _ClassVar[AdapterArchive]
    ADAPTER_ARCHIVE_FILES: _ClassVar[AdapterArchive]

class ChangeKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHANGE_KIND_UNSPECIFIED: _ClassVar[ChangeKind]
    CHANGE_KIND_TENANT_DELETED: _ClassVar[ChangeKind]
    CHANGE_KIND_API_KEY_REVOKED: _ClassVar[ChangeKind]
    CHANGE_KIND_BASE_MODEL_REGISTERED: _ClassVar[ChangeKind]
    CHANGE_KIND_ADAPTER_CREATED: _ClassVar[ChangeKind]
    CHANGE_KIND_ADAPTER_DELETED: _ClassVar[ChangeKind]
    CHANGE_KIND_DEPLOYMENT_BOUND: _ClassVar[ChangeKind]
    CHANGE_KIND_DEPLOYMENT_UNBOUND: _ClassVar[ChangeKind]
ADAPTER_ARCHIVE_UNSPECIFIED: AdapterArchive
ADAPTER_ARCHIVE_ZIP: AdapterArchive
ADAPTER_ARCHIVE_FILES: AdapterArchive
CHANGE_KIND_UNSPECIFIED: ChangeKind
CHANGE_KIND_TENANT_DELETED: ChangeKind
CHANGE_KIND_API_KEY_REVOKED: ChangeKind
CHANGE_KIND_BASE_MODEL_REGISTERED: ChangeKind
CHANGE_KIND_ADAPTER_CREATED: ChangeKind
CHANGE_KIND_ADAPTER_DELETED: ChangeKind
CHANGE_KIND_DEPLOYMENT_BOUND: ChangeKind
CHANGE_KIND_DEPLOYMENT_UNBOUND: ChangeKind

class Tenant(_message.Message):
    __slots__ = ("id", "name", "display_name", "created_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    display_name: str
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., display_name: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateTenantRequest(_message.Message):
    __slots__ = ("name", "display_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DISPLAY_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    display_name: str
    def __init__(self, name: _Optional[str] = ..., display_name: _Optional[str] = ...) -> None: ...

class GetTenantRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListTenantsRequest(_message.Message):
    __slots__ = ("page",)
    PAGE_FIELD_NUMBER: _ClassVar[int]
    page: _generation_pb2.PageRequest
    def __init__(self, page: _Optional[_Union[_generation_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListTenantsResponse(_message.Message):
    __slots__ = ("tenants", "next_page_token")
    TENANTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tenants: _containers.RepeatedCompositeFieldContainer[Tenant]
    next_page_token: str
    def __init__(self, tenants: _Optional[_Iterable[_Union[Tenant, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteTenantRequest(_message.Message):
    __slots__ = ("tenant", "force")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    force: bool
    def __init__(self, tenant: _Optional[str] = ..., force: _Optional[bool] = ...) -> None: ...

class DeleteTenantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ApiKey(_message.Message):
    __slots__ = ("id", "tenant_id", "name", "prefix", "created_at", "expires_at", "revoked_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant_id: str
    name: str
    prefix: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    revoked_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., name: _Optional[str] = ..., prefix: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateApiKeyRequest(_message.Message):
    __slots__ = ("tenant", "name", "ttl_seconds")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    ttl_seconds: int
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class CreateApiKeyResponse(_message.Message):
    __slots__ = ("key", "secret")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    secret: str
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., secret: _Optional[str] = ...) -> None: ...

class ListApiKeysRequest(_message.Message):
    __slots__ = ("tenant", "page")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page: _generation_pb2.PageRequest
    def __init__(self, tenant: _Optional[str] = ..., page: _Optional[_Union[_generation_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListApiKeysResponse(_message.Message):
    __slots__ = ("keys", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RevokeApiKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class VerifyApiKeyRequest(_message.Message):
    __slots__ = ("secret",)
    SECRET_FIELD_NUMBER: _ClassVar[int]
    secret: str
    def __init__(self, secret: _Optional[str] = ...) -> None: ...

class VerifyApiKeyResponse(_message.Message):
    __slots__ = ("key", "tenant")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    key: ApiKey
    tenant: Tenant
    def __init__(self, key: _Optional[_Union[ApiKey, _Mapping]] = ..., tenant: _Optional[_Union[Tenant, _Mapping]] = ...) -> None: ...

class BaseModel(_message.Message):
    __slots__ = ("name", "location", "description", "fingerprint", "created_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    location: str
    description: str
    fingerprint: _model_pb2.ArchitectureFingerprint
    created_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., location: _Optional[str] = ..., description: _Optional[str] = ..., fingerprint: _Optional[_Union[_model_pb2.ArchitectureFingerprint, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RegisterBaseModelRequest(_message.Message):
    __slots__ = ("name", "location", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LOCATION_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    location: str
    description: str
    def __init__(self, name: _Optional[str] = ..., location: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class GetBaseModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListBaseModelsRequest(_message.Message):
    __slots__ = ("page",)
    PAGE_FIELD_NUMBER: _ClassVar[int]
    page: _generation_pb2.PageRequest
    def __init__(self, page: _Optional[_Union[_generation_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListBaseModelsResponse(_message.Message):
    __slots__ = ("base_models", "next_page_token")
    BASE_MODELS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    base_models: _containers.RepeatedCompositeFieldContainer[BaseModel]
    next_page_token: str
    def __init__(self, base_models: _Optional[_Iterable[_Union[BaseModel, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Adapter(_message.Message):
    __slots__ = ("id", "tenant_id", "name", "version", "base_model", "rank", "alpha", "use_rslora", "target_modules", "size_bytes", "sha256", "description", "labels", "created_at", "scaling")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    SCALING_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant_id: str
    name: str
    version: int
    base_model: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    size_bytes: int
    sha256: str
    description: str
    labels: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    scaling: float
    def __init__(self, id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., base_model: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., target_modules: _Optional[_Iterable[str]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., scaling: _Optional[float] = ...) -> None: ...

class UploadFile(_message.Message):
    __slots__ = ("filename", "size_bytes")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    filename: str
    size_bytes: int
    def __init__(self, filename: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class UploadAdapterHeader(_message.Message):
    __slots__ = ("tenant", "name", "base_model", "archive", "files", "override_base_model_check", "content_sha256", "description", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_BASE_MODEL_CHECK_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    base_model: str
    archive: AdapterArchive
    files: _containers.RepeatedCompositeFieldContainer[UploadFile]
    override_base_model_check: bool
    content_sha256: str
    description: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., base_model: _Optional[str] = ..., archive: _Optional[_Union[AdapterArchive, str]] = ..., files: _Optional[_Iterable[_Union[UploadFile, _Mapping]]] = ..., override_base_model_check: _Optional[bool] = ..., content_sha256: _Optional[str] = ..., description: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class UploadAdapterRequest(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: UploadAdapterHeader
    chunk: bytes
    def __init__(self, header: _Optional[_Union[UploadAdapterHeader, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadAdapterResponse(_message.Message):
    __slots__ = ("adapter", "created")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    created: bool
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class GetAdapterRequest(_message.Message):
    __slots__ = ("id", "tenant", "name", "version")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    name: str
    version: int
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("tenant", "name", "base_model", "latest_only", "page")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LATEST_ONLY_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    name: str
    base_model: str
    latest_only: bool
    page: _generation_pb2.PageRequest
    def __init__(self, tenant: _Optional[str] = ..., name: _Optional[str] = ..., base_model: _Optional[str] = ..., latest_only: _Optional[bool] = ..., page: _Optional[_Union[_generation_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[Adapter]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[Adapter, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteAdapterRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteAdapterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DownloadAdapterRequest(_message.Message):
    __slots__ = ("id", "chunk_size")
    ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    id: str
    chunk_size: int
    def __init__(self, id: _Optional[str] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class AdapterManifest(_message.Message):
    __slots__ = ("adapter", "config_json", "size_bytes", "sha256")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    adapter: Adapter
    config_json: str
    size_bytes: int
    sha256: str
    def __init__(self, adapter: _Optional[_Union[Adapter, _Mapping]] = ..., config_json: _Optional[str] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[str] = ...) -> None: ...

class DownloadAdapterResponse(_message.Message):
    __slots__ = ("manifest", "chunk")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    manifest: AdapterManifest
    chunk: bytes
    def __init__(self, manifest: _Optional[_Union[AdapterManifest, _Mapping]] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "tenant_id", "base_model", "adapter_name", "adapter_version", "created_at", "updated_at")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant_id: str
    base_model: str
    adapter_name: str
    adapter_version: int
    created_at: _timestamp_pb2.Timestamp
    updated_at: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., tenant_id: _Optional[str] = ..., base_model: _Optional[str] = ..., adapter_name: _Optional[str] = ..., adapter_version: _Optional[int] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updated_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class BindDeploymentRequest(_message.Message):
    __slots__ = ("name", "tenant", "base_model", "adapter_name", "adapter_version", "replace")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    base_model: str
    adapter_name: str
    adapter_version: int
    replace: bool
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ..., base_model: _Optional[str] = ..., adapter_name: _Optional[str] = ..., adapter_version: _Optional[int] = ..., replace: _Optional[bool] = ...) -> None: ...

class UnbindDeploymentRequest(_message.Message):
    __slots__ = ("name", "tenant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class UnbindDeploymentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResolveDeploymentRequest(_message.Message):
    __slots__ = ("name", "tenant")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    name: str
    tenant: str
    def __init__(self, name: _Optional[str] = ..., tenant: _Optional[str] = ...) -> None: ...

class ResolveDeploymentResponse(_message.Message):
    __slots__ = ("deployment", "adapter", "base_model")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    adapter: Adapter
    base_model: BaseModel
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., adapter: _Optional[_Union[Adapter, _Mapping]] = ..., base_model: _Optional[_Union[BaseModel, _Mapping]] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("tenant", "page")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    PAGE_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    page: _generation_pb2.PageRequest
    def __init__(self, tenant: _Optional[str] = ..., page: _Optional[_Union[_generation_pb2.PageRequest, _Mapping]] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments", "next_page_token")
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    next_page_token: str
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ChangeEvent(_message.Message):
    __slots__ = ("sequence", "kind", "tenant_id", "subject", "created_at", "is_position_marker")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SUBJECT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    IS_POSITION_MARKER_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    kind: ChangeKind
    tenant_id: str
    subject: str
    created_at: _timestamp_pb2.Timestamp
    is_position_marker: bool
    def __init__(self, sequence: _Optional[int] = ..., kind: _Optional[_Union[ChangeKind, str]] = ..., tenant_id: _Optional[str] = ..., subject: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., is_position_marker: _Optional[bool] = ...) -> None: ...

class WatchChangesRequest(_message.Message):
    __slots__ = ("after_sequence", "kinds")
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    kinds: _containers.RepeatedScalarFieldContainer[ChangeKind]
    def __init__(self, after_sequence: _Optional[int] = ..., kinds: _Optional[_Iterable[_Union[ChangeKind, str]]] = ...) -> None: ...

class CollectGarbageRequest(_message.Message):
    __slots__ = ("min_age_seconds", "dry_run")
    MIN_AGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    min_age_seconds: int
    dry_run: bool
    def __init__(self, min_age_seconds: _Optional[int] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class CollectGarbageResponse(_message.Message):
    __slots__ = ("removed_blobs", "removed_bytes")
    REMOVED_BLOBS_FIELD_NUMBER: _ClassVar[int]
    REMOVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    removed_blobs: _containers.RepeatedScalarFieldContainer[str]
    removed_bytes: int
    def __init__(self, removed_blobs: _Optional[_Iterable[str]] = ..., removed_bytes: _Optional[int] = ...) -> None: ...
