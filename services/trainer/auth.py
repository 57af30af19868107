"""Who is calling and which tenant's datasets and jobs they may touch.

- The trainer's admin token (the one it presents to the Registry) makes the caller an
  operator, compared in constant time; an empty admin token makes nobody an operator.
- Anything else is a tenant API key, verified by the Registry (VerifyApiKey). Answers, and
  the tenants operators name, are cached for --auth-cache-seconds (a key never past its
  expiry) in a `FeedCache` (services/common/feed_cache.py): trusted only while the change
  feed is live, dropped as soon as it reports the key revoked or its tenant deleted (feed.py,
  tenants.py), bypassed while it is down (every call asks the Registry: a revocation made
  during a feed outage is refused at once), never stored when read before such an event or
  before the feed (re)connected, and one Registry call serves concurrent callers. Refusals
  are not cached: a key created a moment ago must work at once (no event announces it).
- A tenant key sees only its tenant: `tenant` fields may be empty or name it (id or name);
  another tenant is NOT_FOUND, exactly like an object that does not exist.
- Operators must name the tenant they act for when creating things; listings without a
  tenant show every tenant's objects.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable

from services.common.auth import bearer_token, is_admin_token
from services.common.errors import InvalidArgument, NotFound
from services.common.feed_cache import FeedCache, FeedState, seconds_until
from services.trainer.records import ADMIN, Principal
from services.trainer.registry_client import RegistryClient, TenantInfo


@dataclasses.dataclass(frozen=True)
class _CachedKey:
    principal: Principal
    key_id: str  # what a revocation names
    expires_at: float | None  # unix seconds; None: never


class Authenticator:
    def __init__(self, admin_token: str, registry: RegistryClient, cache_seconds: float, feed: FeedState,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.admin_token, self.registry = admin_token, registry
        self._keys: FeedCache[str, _CachedKey] = FeedCache(cache_seconds, feed, clock=clock)
        self._tenants: FeedCache[str, TenantInfo] = FeedCache(cache_seconds, feed, clock=clock)

    async def principal(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if is_admin_token(self.admin_token, token):
            return ADMIN
        digest = hashlib.sha256(token.encode()).hexdigest()  # no raw secret kept as a cache key

        async def verify() -> _CachedKey:
            verified = await self.registry.verify_api_key(token)
            principal = Principal(is_admin=False, tenant_id=verified.tenant.id, tenant_name=verified.tenant.name)
            return _CachedKey(principal, verified.key_id, verified.expires_at)

        cached = await self._keys.get_or_load(digest, verify, ttl_of=lambda key: seconds_until(key.expires_at))
        return cached.principal

    def forget_key(self, key_id: str) -> None:
        """Drops a revoked key, so it is refused at once instead of for up to --auth-cache-seconds."""
        self._keys.invalidate_values(lambda entry: entry.key_id == key_id)

    def forget_tenant(self, tenant_id: str) -> None:
        """Drops cached keys and names of a deleted tenant, so its callers are refused at once
        instead of for up to --auth-cache-seconds."""
        self._keys.invalidate_values(lambda entry: entry.principal.tenant_id == tenant_id)
        self._tenants.invalidate_values(lambda tenant: tenant.id == tenant_id)

    def clear(self) -> None:
        """Drops everything: the feed lost changes it cannot replay (feed.py, OUT_OF_RANGE)."""
        self._keys.clear()
        self._tenants.clear()

    async def _lookup(self, ref: str) -> TenantInfo:
        return await self._tenants.get_or_load(ref, lambda: self.registry.get_tenant(ref))

    async def tenant(self, principal: Principal, ref: str, field: str = "tenant") -> str:
        """The id of the tenant a call acts for (required for operators)."""
        if principal.is_admin:
            if not ref:
                raise InvalidArgument(f"{field} is required with the admin token", reason="MISSING_FIELD",
                                      field=field)
            return (await self._lookup(ref)).id
        if ref and ref not in (principal.tenant_id, principal.tenant_name):
            raise NotFound(f"tenant '{ref}' not found", reason="TENANT_NOT_FOUND", field=field)
        return principal.tenant_id

    async def tenant_filter(self, principal: Principal, ref: str) -> str | None:
        """For listings: the tenant to show, or None (an operator naming no tenant sees all)."""
        if principal.is_admin and not ref:
            return None
        return await self.tenant(principal, ref)

