"""Who is calling: tenant API keys verified by the Registry, cached briefly.

The Router never sees key hashes or the key table: it asks the Registry (VerifyApiKey,
presenting the admin token) and caches the answer under the sha256 of the secret, so no
raw secret sits in memory longer than the request. A revoked key stops working as soon
as the change feed's API_KEY_REVOKED (or TENANT_DELETED) event arrives, normally within
milliseconds; the cache TTL only bounds staleness if an event were lost. Unknown keys are
never cached: a key created a moment ago must work at once, and there is no feed event for
key creation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Protocol

from services.common.auth import bearer_token
from services.common.errors import Unauthenticated
from services.common.feed_cache import FeedCache, FeedState, seconds_until


@dataclasses.dataclass(frozen=True)
class Caller:
    """A verified API key: whose it is, and until when it is valid."""

    tenant_id: str
    tenant_name: str
    key_id: str
    #: Unix time the key expires, or None.
    expires_at: float | None = None


class KeyVerifier(Protocol):
    async def verify_api_key(self, secret: str) -> Caller:
        """The key's tenant; Unauthenticated when unknown/revoked/expired, Unavailable when the
        Registry cannot answer."""


class Authenticator:
    def __init__(self, verifier: KeyVerifier, ttl_s: float, feed: FeedState) -> None:
        self.verifier = verifier
        self.cache: FeedCache[str, Caller] = FeedCache(ttl_s, feed)

    async def authenticate(self, authorization: str | None) -> Caller:
        secret = bearer_token(authorization, credential="API key")
        digest = hashlib.sha256(secret.encode()).hexdigest()
        caller = await self.cache.get_or_load(digest, lambda: self.verifier.verify_api_key(secret),
                                              ttl_of=lambda verified: seconds_until(verified.expires_at))
        if caller.expires_at is not None and caller.expires_at <= time.time():
            self.cache.invalidate(lambda key: key == digest)
            raise Unauthenticated("the API key has expired", reason="INVALID_API_KEY")
        return caller

    def key_revoked(self, key_id: str) -> None:
        self.cache.invalidate_values(lambda caller: caller.key_id == key_id)

    def tenant_deleted(self, tenant_id: str) -> None:
        self.cache.invalidate_values(lambda caller: caller.tenant_id == tenant_id)

    def clear(self) -> None:
        self.cache.clear()

