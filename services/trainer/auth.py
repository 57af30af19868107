"""Who is calling and which tenant's datasets and jobs they may touch.

- The trainer's admin token (the one it presents to the Registry) makes the caller an
  operator, compared in constant time; an empty admin token makes nobody an operator.
- Anything else is a tenant API key, verified by the Registry (VerifyApiKey). Answers are
  cached for --auth-cache-seconds, never past the key's expiry, and dropped as soon as the
  change feed reports the key revoked or its tenant deleted (feed.py); the TTL only bounds
  staleness while the feed is down. A verification that was in flight when such an event
  arrived is not cached (it may predate the revocation).
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
from services.trainer.records import ADMIN, Principal
from services.trainer.registry_client import RegistryClient, TenantInfo

MAX_CACHED = 10_000


@dataclasses.dataclass(frozen=True)
class _CachedKey:
    principal: Principal
    key_id: str


class _TtlCache:
    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.seconds, self.clock = seconds, clock
        self._items: dict[str, tuple[float, object]] = {}

    def get(self, key: str):
        found = self._items.get(key)
        if found is None or found[0] < self.clock():
            self._items.pop(key, None)
            return None
        return found[1]

    def drop(self, matches: Callable[[object], bool]) -> None:
        self._items = {key: item for key, item in self._items.items() if not matches(item[1])}

    def put(self, key: str, value: object, seconds: float | None = None) -> None:
        """`seconds`: a shorter lifetime for this value (never longer than the cache's)."""
        seconds = self.seconds if seconds is None else min(self.seconds, seconds)
        if seconds <= 0:
            return
        if len(self._items) >= MAX_CACHED:
            self._items.clear()
        self._items[key] = (self.clock() + seconds, value)


class Authenticator:
    def __init__(self, admin_token: str, registry: RegistryClient, cache_seconds: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.admin_token, self.registry = admin_token, registry
        self._keys = _TtlCache(cache_seconds, clock)
        self._tenants = _TtlCache(cache_seconds, clock)
        self._forgets = 0  # bumped by every revocation or deletion: see principal()

    async def principal(self, authorization: str | None) -> Principal:
        token = bearer_token(authorization)
        if is_admin_token(self.admin_token, token):
            return ADMIN
        key = hashlib.sha256(token.encode()).hexdigest()
        cached = self._keys.get(key)
        if cached is None:
            forgets = self._forgets
            verified = await self.registry.verify_api_key(token)
            principal = Principal(is_admin=False, tenant_id=verified.tenant.id, tenant_name=verified.tenant.name)
            cached = _CachedKey(principal, verified.key_id)
            if forgets == self._forgets:  # else a revocation arrived meanwhile: this answer may predate it
                # Kept no longer than the key lives: past its expiry the Registry is asked again.
                left = None if verified.expires_at is None else verified.expires_at - time.time()
                self._keys.put(key, cached, left)
        return cached.principal

    def forget_key(self, key_id: str) -> None:
        """Drops a revoked key, so it is refused at once instead of for up to --auth-cache-seconds."""
        self._forgets += 1
        self._keys.drop(lambda entry: entry.key_id == key_id)

    def forget_tenant(self, tenant_id: str) -> None:
        """Drops cached keys and names of a deleted tenant, so its callers are refused at once
        instead of for up to --auth-cache-seconds."""
        self._forgets += 1
        self._keys.drop(lambda entry: entry.principal.tenant_id == tenant_id)
        self._tenants.drop(lambda tenant: tenant.id == tenant_id)

    async def _lookup(self, ref: str) -> TenantInfo:
        cached = self._tenants.get(ref)
        if cached is None:
            cached = await self.registry.get_tenant(ref)
            self._tenants.put(ref, cached)
        return cached

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
