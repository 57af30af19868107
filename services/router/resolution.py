"""Model names -> what to run: a tenant's deployment (base model + adapter version) or a
bare base model, cached per (tenant, name) and invalidated by the change feed.

Resolution asks the Registry on the tenant's behalf (ResolveDeployment with the caller's
tenant), so another tenant's deployment is NOT_FOUND exactly like a name that does not
exist: the message is the same, and existence is never leaked. A name that is no
deployment of the caller is then tried as a base model (every tenant may run the base
models without an adapter). Unknown names are cached too (negative caching), which is safe
because a bind or a base-model registration publishes a feed event that drops them. A
name longer than any deployment or base model name can be (MAX_MODEL_NAME) is unknown
without asking: it costs no Registry call and no cache entry, and is not echoed whole
(names come from callers, up to the message limit of 64 MiB).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

from services.common.errors import InvalidArgument, NotFound, PermissionDenied
from services.common.fields import MAX_MODEL_NAME
from services.router.auth import Caller
from services.common.feed_cache import FeedCache, FeedState


@dataclasses.dataclass(frozen=True)
class Target:
    """What a request runs with."""

    model: str  # the public name the caller used
    base_model: str
    tenant_id: str
    adapter_id: str = ""  # empty: the base model alone
    adapter_sha256: str = ""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    name: str
    base_model: str
    adapter_name: str = ""  # empty for a base model
    adapter_version: int = 0  # 0: follows the latest version
    created_at: float = 0.0  # unix seconds


class Catalog(Protocol):
    """The Registry, as the resolver needs it (NotFound for unknown names)."""

    async def resolve_deployment(self, name: str, tenant_id: str) -> Target: ...

    async def get_base_model(self, name: str) -> str: ...

    async def list_deployments(self, tenant_id: str) -> list[ModelEntry]: ...

    async def list_base_models(self) -> list[ModelEntry]: ...

    async def unbind_deployment(self, name: str, tenant_id: str) -> None: ...


def unknown_model(name: str) -> NotFound:
    return NotFound(f"model '{name}' not found: it is neither one of your deployments nor a base model "
                    "(ListModels, or GET /v1/models, lists the names you can use)",
                    reason="MODEL_NOT_FOUND", field="model")


class Resolver:
    def __init__(self, catalog: Catalog, ttl_s: float, feed: FeedState) -> None:
        self.catalog = catalog
        self.targets: FeedCache[tuple[str, str], Target] = FeedCache(ttl_s, feed, cache_errors=(NotFound,))
        self.deployments: FeedCache[str, list[ModelEntry]] = FeedCache(ttl_s, feed)
        self.base_models: FeedCache[str, list[ModelEntry]] = FeedCache(ttl_s, feed)

    async def delete(self, caller: Caller, name: str) -> None:
        """OpenAI's model deletion: the caller's deployment name goes (its adapter versions stay,
        and can be deployed again); a base model is refused; another tenant's name is not found.
        The name stops resolving here at once, before the change feed says so."""
        target = await self.resolve(caller, name)
        if not target.adapter_id:
            raise PermissionDenied(f"model '{name}' is a base model: only the deployments of your own adapters can "
                                   "be deleted", reason="BASE_MODEL_NOT_DELETABLE", field="model")
        await self.catalog.unbind_deployment(name, caller.tenant_id)
        self.targets.invalidate(lambda key: key == (caller.tenant_id, name))
        self.deployments.invalidate(lambda key: key == caller.tenant_id)

    async def resolve(self, caller: Caller, name: str) -> Target:
        if not name:
            raise InvalidArgument("model is required: a deployment name or a base model name", field="model")
        if len(name) > MAX_MODEL_NAME:
            raise NotFound(f"model '{name[:MAX_MODEL_NAME]}…' ({len(name)} characters) not found: no deployment or "
                           f"base model name is longer than {MAX_MODEL_NAME} characters", reason="MODEL_NOT_FOUND",
                           field="model")
        return await self.targets.get_or_load((caller.tenant_id, name), lambda: self._resolve(caller, name))

    async def _resolve(self, caller: Caller, name: str) -> Target:
        try:
            return await self.catalog.resolve_deployment(name, caller.tenant_id)
        except NotFound:
            pass
        try:
            base = await self.catalog.get_base_model(name)
        except NotFound:
            raise unknown_model(name) from None
        return Target(model=name, base_model=base, tenant_id=caller.tenant_id)

    async def list_models(self, caller: Caller) -> list[ModelEntry]:
        """The caller's deployments, then the base models, each name once.

        The Registry refuses a deployment named like a base model (and the reverse), but data
        from before it did may hold such a pair; the name is then listed as the deployment,
        because that is what `resolve` runs for it."""
        deployments = await self.deployments.get_or_load(
            caller.tenant_id, lambda: self.catalog.list_deployments(caller.tenant_id))
        bases = await self.base_models.get_or_load("", self.catalog.list_base_models)
        names = {entry.name for entry in deployments}
        return [*deployments, *(entry for entry in bases if entry.name not in names)]

    # --- change feed ---
    def deployment_changed(self, tenant_id: str, name: str) -> None:
        self.targets.invalidate(lambda key: key[1] == name)
        self.deployments.invalidate(lambda key: key == tenant_id)

    def adapters_changed(self, tenant_id: str) -> None:
        """A version appeared or went: deployments that follow "latest" may now mean another one."""
        self.targets.invalidate(lambda key: key[0] == tenant_id)
        self.deployments.invalidate(lambda key: key == tenant_id)

    def base_model_registered(self, name: str) -> None:
        self.targets.invalidate(lambda key: key[1] == name)
        self.base_models.clear()

    def clear(self) -> None:
        for cache in (self.targets, self.deployments, self.base_models):
            cache.clear()
