"""The Registry as the Router uses it: key verification, resolution, listings, change feed.

Every call presents the router's admin token. Registry statuses become domain errors here:
NOT_FOUND stays NOT_FOUND (the resolver words it for the caller); an unreachable Registry
is UNAVAILABLE. The Registry answers UNAUTHENTICATED both for a tenant key it does not know
(reason INVALID_API_KEY) and for a wrong admin token; only the first is the caller's
fault, the second is this router's misconfiguration and must not read "your key is bad".
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from services.common import errors, keepalive, tls
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.rpc import error_info
from services.router.auth import Caller
from services.router.feed import FeedEvent
from services.router.node_client import RECONNECT_OPTIONS
from services.router.resolution import ModelEntry, Target

log = logging.getLogger("loraplex.router.registry")
PAGE = 1000
#: What the Router's caches care about.
WATCHED = [pb.CHANGE_KIND_TENANT_DELETED, pb.CHANGE_KIND_API_KEY_REVOKED, pb.CHANGE_KIND_BASE_MODEL_REGISTERED,
           pb.CHANGE_KIND_ADAPTER_CREATED, pb.CHANGE_KIND_ADAPTER_DELETED, pb.CHANGE_KIND_DEPLOYMENT_BOUND,
           pb.CHANGE_KIND_DEPLOYMENT_UNBOUND]


def _seconds(stamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


class RegistryClient:
    def __init__(self, address: str, admin_token: str, timeout_s: float, max_message_mb: int = 64,
                 client_tls: tls.ClientTls | None = None) -> None:
        self.address, self.timeout_s = address, timeout_s
        self._metadata = (("authorization", f"Bearer {admin_token}"),)
        limit = max_message_mb * 1024 * 1024
        self._channel = tls.aio_channel(address, client_tls, [("grpc.max_receive_message_length", limit),
                                                              *RECONNECT_OPTIONS, *keepalive.client_options()])
        self._stub = registry_pb2_grpc.RegistryStub(self._channel)

    def _lookup_error(self, exc: grpc.aio.AioRpcError, what: str) -> errors.LoraplexError:
        """_error for a lookup by name or id: a malformed one names nothing, so it is NotFound."""
        error = self._error(exc, what)
        return errors.NotFound(error.message) if isinstance(error, errors.InvalidArgument) else error

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> errors.LoraplexError:
        code = exc.code()
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            log.error("the registry refused the router's admin token (%s: %s)", code.name, exc.details())
            return errors.Unavailable("the router cannot authenticate to the registry (check its --admin-token); "
                                      "retry later", reason="ROUTER_MISCONFIGURED")
        if code == grpc.StatusCode.NOT_FOUND:
            return errors.NotFound(exc.details() or "not found")
        if code == grpc.StatusCode.OUT_OF_RANGE:
            return errors.OutOfRange(exc.details() or "out of range")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return errors.InvalidArgument(exc.details() or "invalid argument")
        return errors.Unavailable(f"the registry at {self.address} could not {what}: {code.name} {exc.details()}",
                                  reason="REGISTRY_UNAVAILABLE")

    async def verify_api_key(self, secret: str) -> Caller:
        try:
            reply = await self._stub.VerifyApiKey(pb.VerifyApiKeyRequest(secret=secret), metadata=self._metadata,
                                                  timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED and info is not None and info.reason == "INVALID_API_KEY":
                raise errors.Unauthenticated("invalid API key: unknown, revoked or expired",
                                             reason="INVALID_API_KEY") from None
            raise self._error(exc, "verify an API key") from None
        expires = _seconds(reply.key.expires_at) if reply.key.HasField("expires_at") else None
        return Caller(reply.tenant.id, reply.tenant.name, reply.key.id, expires)

    async def resolve_deployment(self, name: str, tenant_id: str) -> Target:
        try:
            reply = await self._stub.ResolveDeployment(pb.ResolveDeploymentRequest(name=name, tenant=tenant_id),
                                                       metadata=self._metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._lookup_error(exc, "resolve a model name") from None
        return Target(model=name, base_model=reply.deployment.base_model, tenant_id=tenant_id,
                      adapter_id=reply.adapter.id, adapter_sha256=reply.adapter.sha256)

    async def adapter_name(self, adapter_id: str) -> tuple[str, str]:
        """(name, base model) of an adapter version; NotFound once it is deleted."""
        try:
            reply = await self._stub.GetAdapter(pb.GetAdapterRequest(id=adapter_id), metadata=self._metadata,
                                                timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._lookup_error(exc, "look up an adapter") from None
        return reply.name, reply.base_model

    async def unbind_deployment(self, name: str, tenant_id: str) -> None:
        """Removes a tenant's deployment name (its adapter versions stay); NotFound if it has none."""
        try:
            await self._stub.UnbindDeployment(pb.UnbindDeploymentRequest(name=name, tenant=tenant_id),
                                              metadata=self._metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "delete a model") from None

    async def get_base_model(self, name: str) -> str:
        try:
            reply = await self._stub.GetBaseModel(pb.GetBaseModelRequest(name=name), metadata=self._metadata,
                                                  timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._lookup_error(exc, "look up a base model") from None
        return reply.name

    async def list_deployments(self, tenant_id: str) -> list[ModelEntry]:
        entries, token = [], ""
        while True:
            try:
                reply = await self._stub.ListDeployments(
                    pb.ListDeploymentsRequest(tenant=tenant_id, page={"page_size": PAGE, "page_token": token}),
                    metadata=self._metadata, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc, "list deployments") from None
            entries += [ModelEntry(d.name, d.base_model, d.adapter_name, d.adapter_version, _seconds(d.created_at))
                        for d in reply.deployments]
            token = reply.next_page_token
            if not token:
                return entries

    async def list_base_models(self) -> list[ModelEntry]:
        entries, token = [], ""
        while True:
            try:
                reply = await self._stub.ListBaseModels(
                    pb.ListBaseModelsRequest(page={"page_size": PAGE, "page_token": token}),
                    metadata=self._metadata, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                raise self._error(exc, "list base models") from None
            entries += [ModelEntry(b.name, b.name, created_at=_seconds(b.created_at)) for b in reply.base_models]
            token = reply.next_page_token
            if not token:
                return entries

    async def watch(self, after_sequence: int) -> AsyncIterator[FeedEvent]:
        call = self._stub.WatchChanges(pb.WatchChangesRequest(after_sequence=after_sequence, kinds=WATCHED),
                                       metadata=self._metadata)
        try:
            async for event in call:
                yield FeedEvent(sequence=event.sequence,
                                kind=pb.ChangeKind.Name(event.kind).removeprefix("CHANGE_KIND_"),
                                tenant_id=event.tenant_id, subject=event.subject,
                                is_position_marker=event.is_position_marker)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "stream its change feed") from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()
