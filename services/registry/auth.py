"""Who is calling, and which tenant's objects they may touch.

A caller presents `authorization: Bearer <token>`; the servicer hands the token here and
gets back a `Principal`, a plain object (no gRPC), which every domain call receives.
- The admin token comes from config and is compared in constant time. An empty admin token
  means no admin at all: no bearer can become admin by sending an empty string.
- Anything else is looked up as a tenant API key by its sha256 (see keys.py).
- A tenant key sees only its tenant. Another tenant's objects answer NOT_FOUND, exactly as
  objects that do not exist, so existence is never leaked.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.common.auth import is_admin_token
from services.common.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from services.registry.db.models import ApiKey, Tenant, utcnow

TENANT_ID_PREFIX = "tnt_"


def hash_secret(secret: str) -> str:
    """How an API key is stored and looked up; keys.py says why a plain sha256 is right."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Principal:
    is_admin: bool
    tenant_id: str = ""
    key_id: str = ""

    @property
    def label(self) -> str:
        return "admin" if self.is_admin else f"tenant {self.tenant_id} (key {self.key_id})"


ADMIN = Principal(is_admin=True)


def authenticate(session: Session, admin_token: str, token: str) -> Principal:
    if is_admin_token(admin_token, token):
        return ADMIN
    key = session.scalar(select(ApiKey).where(ApiKey.secret_sha256 == hash_secret(token)))
    if key is None or not key_is_valid(key, utcnow()):
        raise Unauthenticated("unknown, revoked or expired token", reason="INVALID_CREDENTIALS")
    return Principal(is_admin=False, tenant_id=key.tenant_id, key_id=key.id)


def key_is_valid(key: ApiKey, now: dt.datetime) -> bool:
    return key.revoked_at is None and (key.expires_at is None or key.expires_at > now)


def require_admin(principal: Principal, action: str) -> None:
    if not principal.is_admin:
        raise PermissionDenied(f"{action} needs the admin token; a tenant API key cannot do it",
                               reason="ADMIN_ONLY")


#: Row locks for `find_tenant`/`scoped_tenant` (PostgreSQL; SQLite writers never overlap).
#: A writer that adds rows under a tenant takes SHARE: a DeleteTenant in progress makes it wait
#: and then find the tenant gone (NOT_FOUND) instead of failing a foreign key after the
#: deletion commits. DeleteTenant takes UPDATE before it reads what to delete, so no row can be
#: added under the tenant between that read and the delete (tenants.py).
SHARE, UPDATE = "share", "update"


def _locked(query, lock: str):
    return query.with_for_update(read=lock == SHARE) if lock else query


def find_tenant(session: Session, ref: str, *, lock: str = "") -> Tenant | None:
    """A tenant by id (`tnt_…`) or by name; `lock` is "", SHARE or UPDATE."""
    column = Tenant.id if ref.startswith(TENANT_ID_PREFIX) else Tenant.name
    return session.scalar(_locked(select(Tenant).where(column == ref), lock))


def scoped_tenant(session: Session, principal: Principal, ref: str, *, field: str = "tenant",
                  lock: str = "") -> Tenant:
    """The tenant a call acts on.

    Admin: `ref` is required and must exist. Tenant key: `ref` may be empty (its own tenant)
    or name it by id or name; any other tenant is NOT_FOUND.
    """
    if principal.is_admin:
        if not ref:
            raise InvalidArgument(f"{field} is required with the admin token", reason="MISSING_FIELD", field=field)
        tenant = find_tenant(session, ref, lock=lock)
    else:
        tenant = session.scalar(_locked(select(Tenant).where(Tenant.id == principal.tenant_id), lock))
        if ref and tenant is not None and ref not in (tenant.id, tenant.name):
            tenant = None
    if tenant is None:
        raise NotFound(f"tenant '{ref}' not found", reason="TENANT_NOT_FOUND", field=field)
    return tenant


def check_owner(principal: Principal, tenant_id: str, not_found: NotFound) -> None:
    """Raises `not_found` when a tenant key reaches for another tenant's object.

    `not_found` must be the very error the caller raises for an id that does not exist: the
    client sees the status, the message *and* the ErrorInfo (reason, metadata), so any
    difference, even a reason of NOT_FOUND instead of ADAPTER_NOT_FOUND, tells a probing
    tenant that the id belongs to someone else."""
    if not principal.is_admin and principal.tenant_id != tenant_id:
        raise not_found
