"""Tenants: created and deleted by operators; a tenant key may read its own tenant.

Deleting a tenant removes its keys, adapter rows and deployments in one transaction and
emits one event per removed object (so caches keyed by key, adapter or deployment need no
tenant index) and finally TENANT_DELETED. Adapter weights stay in the blob store until
garbage collection, because another tenant may have uploaded identical bytes.

Each object's deletion event is emitted exactly once, by the transaction whose statement
removed (or revoked) its row: DeleteTenant announces what its DELETEs returned, and the
single-object calls (DeleteAdapter, UnbindDeployment, RevokeApiKey) lock their row before
they check and change it. Whichever of the two reaches the row first holds its lock to commit;
the other waits and then finds the row gone (NOT_FOUND, or skipped by the DELETE) or revoked.
"""

from __future__ import annotations

import re
import uuid

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.registry import feed, paging
from services.registry.auth import TENANT_ID_PREFIX, UPDATE, Principal, find_tenant, require_admin, scoped_tenant
from services.registry.context import RegistryContext
from services.registry.db.models import Adapter, AdapterName, ApiKey, Deployment, Tenant, utcnow

# Checked with fullmatch: `$` alone also matches before a trailing newline ("acme\n").
TENANT_NAME = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
MAX_DISPLAY_NAME = 255


def create_tenant(ctx: RegistryContext, principal: Principal, name: str, display_name: str) -> Tenant:
    require_admin(principal, "CreateTenant")
    if not TENANT_NAME.fullmatch(name):
        raise InvalidArgument(f"tenant name {name!r} must be 1-63 characters of [a-z0-9-] starting with a letter",
                              reason="BAD_NAME", field="name", actual=name)
    if len(display_name) > MAX_DISPLAY_NAME:
        raise InvalidArgument(f"display_name is longer than {MAX_DISPLAY_NAME} characters", field="display_name")
    exists = AlreadyExists(f"tenant '{name}' already exists", reason="TENANT_EXISTS", field="name")
    try:
        with ctx.db.write() as session:
            if session.scalar(select(Tenant.id).where(Tenant.name == name)):
                raise exists
            tenant = Tenant(id=TENANT_ID_PREFIX + uuid.uuid4().hex, name=name, display_name=display_name or name,
                            created_at=utcnow())
            session.add(tenant)
    except IntegrityError:  # a concurrent create of the same name won the race
        raise exists from None
    return tenant


def get_tenant(ctx: RegistryContext, principal: Principal, ref: str) -> Tenant:
    with ctx.db.read() as session:
        return scoped_tenant(session, principal, ref)


def list_tenants(ctx: RegistryContext, principal: Principal, page: paging.Page) -> tuple[list[Tenant], str]:
    require_admin(principal, "ListTenants")
    with ctx.db.read() as session:
        query = select(Tenant).order_by(Tenant.name).limit(page.size + 1)
        if page.after:
            query = query.where(Tenant.name > page.after[0])
        rows = list(session.scalars(query))
    return paging.split(rows, page, lambda tenant: [tenant.name])


def delete_tenant(ctx: RegistryContext, principal: Principal, ref: str, force: bool) -> None:
    require_admin(principal, "DeleteTenant")
    if not ref:
        raise InvalidArgument("tenant is required", reason="MISSING_FIELD", field="tenant")
    with ctx.db.write() as session:
        # FOR UPDATE before reading what to delete: writers that add rows under the tenant hold it
        # FOR SHARE (auth.py), so those in progress finish first and their rows are read below,
        # and later ones wait and then find no tenant. Without it a row committed between our
        # reads and our deletes was deleted with no event, and caches kept it.
        tenant = find_tenant(session, ref, lock=UPDATE)
        if tenant is None:
            raise NotFound(f"tenant '{ref}' not found", reason="TENANT_NOT_FOUND", field="tenant")
        deployments = list(session.scalars(select(Deployment.name).where(Deployment.tenant_id == tenant.id)
                                           .order_by(Deployment.name)))
        if deployments and not force:
            shown = ", ".join(deployments[:5]) + (" ..." if len(deployments) > 5 else "")
            raise FailedPrecondition(f"tenant '{tenant.name}' still owns {len(deployments)} deployment(s) ({shown}); "
                                     "unbind them or pass force", reason="TENANT_HAS_DEPLOYMENTS")
        # Explicit deletes (not only ON DELETE CASCADE): the same on every database and every
        # foreign-key setting. The events come from the rows the deletes RETURN, never from the
        # reads above: a single-object deletion that committed after those reads has announced its
        # object itself (it used to be announced twice), and one still in progress holds its row,
        # so our DELETE waits for it and then skips the row, or returns it already revoked.
        unbound = [name for name, in _delete_returning(session, Deployment, tenant.id, Deployment.name)]
        removed = [adapter_id for adapter_id, in _delete_returning(session, Adapter, tenant.id, Adapter.id)]
        session.execute(delete(AdapterName).where(AdapterName.tenant_id == tenant.id))
        keys = _delete_returning(session, ApiKey, tenant.id, ApiKey.id, ApiKey.revoked_at)
        revoked = [key_id for key_id, revoked_at in keys if revoked_at is None]  # earlier revokes had theirs
        session.delete(tenant)
        for name in unbound:
            feed.record(ctx, session, feed.DEPLOYMENT_UNBOUND, tenant.id, name)
        for adapter_id in removed:
            feed.record(ctx, session, feed.ADAPTER_DELETED, tenant.id, adapter_id)
        for key_id in revoked:
            feed.record(ctx, session, feed.API_KEY_REVOKED, tenant.id, key_id)
        feed.record(ctx, session, feed.TENANT_DELETED, tenant.id, tenant.name)


def _delete_returning(session, model, tenant_id: str, *columns) -> list[tuple]:
    """Deletes the tenant's rows of `model` and returns `columns` of the rows it removed, sorted by
    the first (a key: RETURNING's order is unspecified, and sorted the feed reads the same on both
    databases)."""
    result = session.execute(delete(model).where(model.tenant_id == tenant_id).returning(*columns))
    return sorted((tuple(row) for row in result), key=lambda row: row[0])
