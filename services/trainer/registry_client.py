"""The trainer's calls to the Registry (grpc.aio), with statuses turned into domain errors.

Every call presents the trainer's admin token and acts on behalf of a tenant by naming it.
A Registry refusal of that token is the operator's problem, not the caller's, so it becomes
UNAVAILABLE naming --admin-token rather than UNAUTHENTICATED. VerifyApiKey tells an unknown
key (reason INVALID_API_KEY -> UNAUTHENTICATED for the caller) from a refused admin token.

The change feed (`watch_changes`) is a stream without a deadline: it stays open until the
watcher (feed.py) stops reading it or the connection breaks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from services.common import errors, keepalive, tls
from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.rpc import error_info
from services.trainer.records import FeedEvent

CHUNK = 1024 * 1024
_PASS_THROUGH = {
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
}


@dataclasses.dataclass(frozen=True)
class TenantInfo:
    id: str
    name: str


@dataclasses.dataclass(frozen=True)
class KeyInfo:
    """A verified API key: its tenant, its id (what a revocation names) and when it expires."""

    tenant: TenantInfo
    key_id: str
    expires_at: float | None = None  # unix seconds; None: never


@dataclasses.dataclass(frozen=True)
class BaseModelInfo:
    name: str
    location: str
    max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class PublishedAdapter:
    id: str
    name: str
    version: int
    created: bool


class RegistryClient:
    def __init__(self, address: str, admin_token: str, timeout_s: float, max_message_mb: int = 64,
                 client_tls: tls.ClientTls | None = None) -> None:
        self.address, self.timeout_s, self.client_tls = address, timeout_s, client_tls
        self._metadata = (("authorization", f"Bearer {admin_token}"),)
        self._limit = max_message_mb * 1024 * 1024
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> registry_pb2_grpc.RegistryStub:
        if self._channel is None:  # created on first use: an aio channel belongs to its event loop
            self._channel = tls.aio_channel(self.address, self.client_tls, [
                ("grpc.max_receive_message_length", self._limit), ("grpc.max_send_message_length", self._limit),
                *keepalive.client_options()])
        return registry_pb2_grpc.RegistryStub(self._channel)

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> errors.LoraplexError:
        code, details = exc.code(), exc.details() or ""
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            return errors.Unavailable(f"the registry at {self.address} refused the trainer's admin token while "
                                      f"{what} ({details}); check the trainer's --admin-token",
                                      reason="REGISTRY_REFUSED_TRAINER")
        if code in _PASS_THROUGH:
            info = error_info(exc)
            metadata = {k: v for k, v in (info.metadata if info else {}).items() if k not in ("reason", "message")}
            return _PASS_THROUGH[code](details, reason=info.reason if info else None, **metadata)
        return errors.Unavailable(f"the registry at {self.address} failed while {what}: {code.name} {details}",
                                  reason="REGISTRY_UNAVAILABLE")

    async def _call(self, what: str, method: str, request):
        try:
            return await getattr(self._stub(), method)(request, metadata=self._metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, what) from None

    async def verify_api_key(self, secret: str) -> KeyInfo:
        try:
            reply = await self._stub().VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret), metadata=self._metadata,
                                                    timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and info is not None and info.reason == "INVALID_API_KEY":
                raise errors.Unauthenticated("unknown, revoked or expired token",
                                             reason="INVALID_CREDENTIALS") from None
            raise self._error(exc, "verifying an API key") from None
        expires = reply.key.expires_at.seconds + reply.key.expires_at.nanos / 1e9 \
            if reply.key.HasField("expires_at") else None
        return KeyInfo(TenantInfo(reply.tenant.id, reply.tenant.name), reply.key.id, expires)

    async def get_tenant(self, ref: str) -> TenantInfo:
        reply = await self._call(f"looking up tenant '{ref}'", "GetTenant", pb.GetTenantRequest(tenant=ref))
        return TenantInfo(reply.id, reply.name)

    async def tenant_exists(self, tenant_id: str) -> bool:
        try:
            await self.get_tenant(tenant_id)
        except errors.NotFound:
            return False
        return True

    async def watch_changes(self, after_sequence: int) -> AsyncIterator[FeedEvent]:
        call = self._stub().WatchChanges(pb.WatchChangesRequest(after_sequence=after_sequence),
                                         metadata=self._metadata)
        try:
            async for event in call:
                try:
                    kind = pb.ChangeKind.Name(event.kind).removeprefix("CHANGE_KIND_")
                except ValueError:  # a kind newer than this trainer: nothing it acts on
                    kind = ""
                yield FeedEvent(sequence=event.sequence, kind=kind, tenant_id=event.tenant_id, subject=event.subject,
                                is_position_marker=event.is_position_marker)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.OUT_OF_RANGE:  # the caller must start over: not a failure
                raise errors.OutOfRange(exc.details() or "change feed cursor out of range") from None
            raise self._error(exc, "following the change feed") from None
        finally:
            call.cancel()

    async def get_base_model(self, name: str) -> BaseModelInfo:
        reply = await self._call(f"looking up base model '{name}'", "GetBaseModel", pb.GetBaseModelRequest(name=name))
        return BaseModelInfo(reply.name, reply.location, reply.fingerprint.max_position_embeddings)

    async def is_base_model(self, name: str) -> bool:
        try:
            await self.get_base_model(name)
        except errors.NotFound:
            return False
        return True

    async def deployment_taken(self, name: str, tenant_id: str) -> bool:
        """Whether another tenant has bound `name` (deployment names are global): the admin
        token resolving it for no tenant finds its owner, whichever that is."""
        try:
            reply = await self._call(f"looking up deployment '{name}'", "ResolveDeployment",
                                     pb.ResolveDeploymentRequest(name=name))
        except errors.NotFound as exc:
            if exc.reason == "DEPLOYMENT_NOT_FOUND":
                return False
            # Bound, but to a missing adapter version: only its owner's view says whose.
            try:
                await self._call(f"looking up deployment '{name}'", "ResolveDeployment",
                                 pb.ResolveDeploymentRequest(name=name, tenant=tenant_id))
            except errors.NotFound as mine:
                return mine.reason == "DEPLOYMENT_NOT_FOUND"
            return False
        return reply.deployment.tenant_id != tenant_id

    async def upload_adapter(self, tenant_id: str, name: str, base_model: str, folder: Path, description: str,
                             labels: dict[str, str]) -> PublishedAdapter:
        """Uploads a PEFT folder (adapter_config.json + adapter_model.safetensors) as FILES."""
        files = [folder / "adapter_config.json", folder / "adapter_model.safetensors"]
        header = pb.UploadAdapterHeader(tenant=tenant_id, name=name, base_model=base_model,
                                        archive=pb.ADAPTER_ARCHIVE_FILES, description=description, labels=labels,
                                        files=[pb.UploadFile(filename=f.name, size_bytes=f.stat().st_size)
                                               for f in files])

        async def messages():
            yield pb.UploadAdapterRequest(header=header)
            for path in files:
                with open(path, "rb") as source:
                    while chunk := source.read(CHUNK):
                        yield pb.UploadAdapterRequest(chunk=chunk)

        try:
            reply = await self._stub().UploadAdapter(messages(), metadata=self._metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, f"uploading adapter '{name}'") from None
        return PublishedAdapter(reply.adapter.id, reply.adapter.name, reply.adapter.version, reply.created)

    async def bind_deployment(self, name: str, tenant_id: str, base_model: str, adapter_name: str,
                              version: int) -> None:
        await self._call(f"binding deployment '{name}'", "BindDeployment", pb.BindDeploymentRequest(
            name=name, tenant=tenant_id, base_model=base_model, adapter_name=adapter_name, adapter_version=version,
            replace=True))

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
