"""Tenant API keys: created once, shown once, stored as a hash, revocable at once.

A secret is `lpx_` + 32 random bytes (256 bits) in base64url. Because the secret is a
uniformly random 256-bit value and not a human-chosen password, a single fast sha256 is the
right storage: there is nothing to brute-force or look up in a dictionary, so salts and slow
KDFs (bcrypt, argon2) would only slow every request down. The hash is also the lookup key,
so verifying a key is one indexed query. `prefix` (the first 12 characters) lets people
tell keys apart in listings without revealing anything useful.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid

from sqlalchemy import select, tuple_

from services.common.errors import InvalidArgument, NotFound, Unauthenticated
from services.registry import feed, paging
from services.registry.auth import (SHARE, Principal, check_owner, find_tenant, hash_secret, key_is_valid,
                                    require_admin, scoped_tenant)
from services.registry.context import RegistryContext
from services.common.fields import require
from services.registry.db.models import ApiKey, Tenant, utcnow

SECRET_PREFIX = "lpx_"
PREFIX_CHARS = 12
MAX_NAME = 255
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def create_key(ctx: RegistryContext, principal: Principal, tenant_ref: str, name: str,
               ttl_seconds: int) -> tuple[ApiKey, str]:
    require_admin(principal, "CreateApiKey")
    if not tenant_ref:
        raise InvalidArgument("tenant is required", reason="MISSING_FIELD", field="tenant")
    if len(name) > MAX_NAME:
        raise InvalidArgument(f"key name is longer than {MAX_NAME} characters", field="name")
    if ttl_seconds > MAX_TTL_SECONDS:
        raise InvalidArgument(f"ttl_seconds must be at most {MAX_TTL_SECONDS} (ten years), got {ttl_seconds}",
                              field="ttl_seconds")
    secret = new_secret()
    with ctx.db.write() as session:
        tenant = find_tenant(session, tenant_ref, lock=SHARE)  # waits out a DeleteTenant (auth.py)
        if tenant is None:
            raise NotFound(f"tenant '{tenant_ref}' not found", reason="TENANT_NOT_FOUND", field="tenant")
        now = utcnow()
        key = ApiKey(id="key_" + uuid.uuid4().hex, tenant_id=tenant.id, name=name, prefix=secret[:PREFIX_CHARS],
                     secret_sha256=hash_secret(secret), created_at=now,
                     expires_at=now + dt.timedelta(seconds=ttl_seconds) if ttl_seconds else None)
        session.add(key)
    return key, secret


def list_keys(ctx: RegistryContext, principal: Principal, tenant: str,
              page: paging.Page) -> tuple[list[ApiKey], str]:
    with ctx.db.read() as session:
        owner = scoped_tenant(session, principal, tenant)
        query = select(ApiKey).where(ApiKey.tenant_id == owner.id)
        if page.after:
            query = query.where(tuple_(ApiKey.name, ApiKey.id) > tuple_(*page.after))
        rows = list(session.scalars(query.order_by(ApiKey.name, ApiKey.id).limit(page.size + 1)))
    return paging.split(rows, page, lambda key: [key.name, key.id])


def revoke_key(ctx: RegistryContext, principal: Principal, key_id: str) -> ApiKey:
    require(key_id, "key_id")
    with ctx.db.write() as session:
        # FOR UPDATE: a racing DeleteTenant either waits for this revoke (and then deletes the key
        # already revoked, announcing nothing more) or deletes it first (and we find no key).
        key = session.get(ApiKey, key_id, with_for_update=True)
        not_found = NotFound(f"API key '{key_id}' not found", reason="KEY_NOT_FOUND", field="key_id")
        if key is None:
            raise not_found
        check_owner(principal, key.tenant_id, not_found)
        if key.revoked_at is None:  # idempotent: a second revoke changes nothing and emits nothing
            key.revoked_at = utcnow()
            feed.record(ctx, session, feed.API_KEY_REVOKED, key.tenant_id, key.id)
    return key


def verify_key(ctx: RegistryContext, principal: Principal, secret: str) -> tuple[ApiKey, Tenant]:
    require_admin(principal, "VerifyApiKey")
    with ctx.db.read() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.secret_sha256 == hash_secret(secret))) if secret else None
        if key is None or not key_is_valid(key, utcnow()):
            raise Unauthenticated("the API key is unknown, revoked or expired", reason="INVALID_API_KEY")
        tenant = session.get(Tenant, key.tenant_id)
    return key, tenant
