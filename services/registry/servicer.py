"""The Registry gRPC servicer: protobuf in -> domain call -> protobuf out.

Every RPC authenticates first (auth.py), then runs its domain function on the registry's
thread pool (the domain is synchronous SQLAlchemy and blob I/O), so the event loop only
moves messages. Domain errors become statuses in services/common/rpc.py. Until the app has
finished starting (migrations, bucket) every RPC answers UNAVAILABLE, and so does one
that finds the blob store down (domain functions say what was done; `_run` catches the rest).
"""

from __future__ import annotations

import asyncio
import functools
from concurrent.futures import Executor

from services.common.auth import bearer_token, is_admin_token
from services.common.errors import InvalidArgument, Unavailable
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.registry import (adapters, auth, base_models, convert, deployments, feed, gc, keys, paging, tenants,
                               uploads)
from services.registry.blobstore.base import BlobStoreUnavailable
from services.registry.blobstore.outage import store_unavailable
from services.registry.context import RegistryContext
from services.common.request_text import check_no_nul
from services.common.upload_slots import UploadSlots


def _authenticate_key(ctx: RegistryContext, token: str) -> auth.Principal:
    with ctx.db.read() as session:
        return auth.authenticate(session, ctx.admin_token, token)


class RegistryServicer(registry_pb2_grpc.RegistryServicer):
    def __init__(self, executor: Executor) -> None:
        self._executor = executor
        self._ctx: RegistryContext | None = None
        self.upload_slots = UploadSlots()  # bounds one tenant's share of the spool disk

    def attach(self, ctx: RegistryContext) -> None:
        self._ctx = ctx

    @property
    def ctx(self) -> RegistryContext:
        if self._ctx is None:
            raise Unavailable("the registry is starting; retry shortly", reason="STARTING")
        return self._ctx

    async def _run(self, fn, *args, **kwargs):
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor,
                                                                    functools.partial(fn, *args, **kwargs))
        except BlobStoreUnavailable as exc:  # a store call no domain function put into words: still retryable
            raise store_unavailable(exc, "the call may have stopped part way") from None

    async def _principal(self, context) -> auth.Principal:
        ctx = self.ctx
        metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
        token = bearer_token(metadata.get("authorization"))
        if is_admin_token(ctx.admin_token, token):  # no database round trip for operators and services
            return auth.ADMIN
        return await self._run(_authenticate_key, ctx, token)

    async def _call(self, request, context, fn, *args):
        """Authenticates, checks the request's text, then runs fn(ctx, principal, *args) on the pool."""
        principal = await self._principal(context)
        check_no_nul(request)
        return await self._run(fn, self.ctx, principal, *args)

    async def _list(self, request, context, listing: str, page, fn, **query):
        """Authenticates, then runs fn(ctx, principal, **query, page=...). The page token is bound
        to `query` and the caller's tenant (admin: none), so it only continues this same listing."""
        principal = await self._principal(context)
        check_no_nul(request)
        bound = paging.page_request(listing, page.page_size, page.page_token, caller=principal.tenant_id, **query)
        return await self._run(fn, self.ctx, principal, page=bound, **query)

    # --- Tenants ---

    async def CreateTenant(self, request, context):
        return convert.tenant(await self._call(request, context, tenants.create_tenant, request.name,
                                               request.display_name))

    async def GetTenant(self, request, context):
        return convert.tenant(await self._call(request, context, tenants.get_tenant, request.tenant))

    async def ListTenants(self, request, context):
        rows, token = await self._list(request, context, "tenants", request.page, tenants.list_tenants)
        return pb.ListTenantsResponse(tenants=[convert.tenant(r) for r in rows], next_page_token=token)

    async def DeleteTenant(self, request, context):
        await self._call(request, context, tenants.delete_tenant, request.tenant, request.force)
        return pb.DeleteTenantResponse()

    # --- API keys ---

    async def CreateApiKey(self, request, context):
        key, secret = await self._call(request, context, keys.create_key, request.tenant, request.name,
                                       request.ttl_seconds)
        return pb.CreateApiKeyResponse(key=convert.api_key(key), secret=secret)

    async def ListApiKeys(self, request, context):
        rows, token = await self._list(request, context, "api_keys", request.page, keys.list_keys,
                                       tenant=request.tenant)
        return pb.ListApiKeysResponse(keys=[convert.api_key(r) for r in rows], next_page_token=token)

    async def RevokeApiKey(self, request, context):
        return convert.api_key(await self._call(request, context, keys.revoke_key, request.key_id))

    async def VerifyApiKey(self, request, context):
        key, tenant = await self._call(request, context, keys.verify_key, request.secret)
        return pb.VerifyApiKeyResponse(key=convert.api_key(key), tenant=convert.tenant(tenant))

    # --- Base models ---

    async def RegisterBaseModel(self, request, context):
        row = await self._call(request, context, base_models.register_base_model, request.name, request.location,
                               request.description)
        return convert.base_model(row)

    async def GetBaseModel(self, request, context):
        return convert.base_model(await self._call(request, context, base_models.get_base_model, request.name))

    async def ListBaseModels(self, request, context):
        rows, token = await self._list(request, context, "base_models", request.page, base_models.list_base_models)
        return pb.ListBaseModelsResponse(base_models=[convert.base_model(r) for r in rows], next_page_token=token)

    # --- Adapters ---

    async def UploadAdapter(self, request_iterator, context):
        principal = await self._principal(context)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first UploadAdapter message must be the header", reason="BAD_HEADER",
                                  field="header")
        check_no_nul(first.header, "header.")
        ctx = self.ctx
        plan = await self._run(uploads.begin_upload, ctx, principal, convert.upload_header(first.header))
        async with self.upload_slots.hold("" if principal.is_admin else principal.tenant_id):
            body = await self._run(uploads.UploadBody, ctx.spool_dir, plan, ctx.limits.max_upload_bytes)
            try:
                async for message in messages:
                    if message.WhichOneof("payload") != "chunk":
                        raise InvalidArgument("only the first UploadAdapter message may be a header",
                                              reason="BAD_HEADER", field="header")
                    body.write(message.chunk)
            except BaseException:
                body.discard()
                raise
            row, created = await self._run(uploads.finish_upload, ctx, plan, body)
        return pb.UploadAdapterResponse(adapter=convert.adapter(row), created=created)

    async def GetAdapter(self, request, context):
        row = await self._call(request, context, adapters.get_adapter, request.id, request.tenant, request.name,
                               request.version)
        return convert.adapter(row)

    async def ListAdapters(self, request, context):
        rows, token = await self._list(request, context, "adapters", request.page, adapters.list_adapters,
                                       tenant=request.tenant, name=request.name, base_model=request.base_model,
                                       latest_only=request.latest_only)
        return pb.ListAdaptersResponse(adapters=[convert.adapter(r) for r in rows], next_page_token=token)

    async def DeleteAdapter(self, request, context):
        await self._call(request, context, adapters.delete_adapter, request.id)
        return pb.DeleteAdapterResponse()

    async def DownloadAdapter(self, request, context):
        row, reader = await self._call(request, context, adapters.open_download, request.id)
        try:
            yield pb.DownloadAdapterResponse(manifest=pb.AdapterManifest(
                adapter=convert.adapter(row), config_json=row.config_json, size_bytes=row.size_bytes,
                sha256=row.sha256))
            size = adapters.chunk_size(request.chunk_size)
            while chunk := await self._run(reader.read, size):
                yield pb.DownloadAdapterResponse(chunk=chunk)
        finally:
            await self._run(reader.close)

    # --- Deployments ---

    async def BindDeployment(self, request, context):
        row = await self._call(request, context, deployments.bind_deployment, request.name, request.tenant,
                               request.base_model, request.adapter_name, request.adapter_version, request.replace)
        return convert.deployment(row)

    async def UnbindDeployment(self, request, context):
        await self._call(request, context, deployments.unbind_deployment, request.name, request.tenant)
        return pb.UnbindDeploymentResponse()

    async def ResolveDeployment(self, request, context):
        deployment, adapter, base = await self._call(request, context, deployments.resolve_deployment, request.name,
                                                     request.tenant)
        return pb.ResolveDeploymentResponse(deployment=convert.deployment(deployment), adapter=convert.adapter(adapter),
                                            base_model=convert.base_model(base))

    async def ListDeployments(self, request, context):
        rows, token = await self._list(request, context, "deployments", request.page, deployments.list_deployments,
                                       tenant=request.tenant)
        return pb.ListDeploymentsResponse(deployments=[convert.deployment(r) for r in rows], next_page_token=token)

    # --- Change feed and maintenance ---

    async def WatchChanges(self, request, context):
        principal = await self._principal(context)
        kinds = convert.change_kinds(request.kinds)
        async for event in feed.watch(self.ctx, principal, request.after_sequence, kinds, self._run):
            yield convert.change_event(event)

    async def CollectGarbage(self, request, context):
        removed, freed = await self._call(request, context, gc.collect_garbage, request.min_age_seconds,
                                          request.dry_run)
        return pb.CollectGarbageResponse(removed_blobs=removed, removed_bytes=freed)
