"""Adapter versions after upload: get, list, delete, download. Always tenant-scoped.

Listing order is (name ascending, version descending): stable, and newest first within a
name as the API promises. Deleting a version removes its row only; its weights may be shared
with identical uploads, so the blob is left for garbage collection (which is also why a
delete never touches the blob store and works while it is down). A version a deployment
needs cannot be deleted: pinned by version, or the last version of its name (for that base
model) under a deployment that follows "latest".
"""

from __future__ import annotations

from typing import BinaryIO

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import aliased

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.registry import feed, paging
from services.registry.auth import Principal, check_owner, scoped_tenant
from services.registry.blobstore.outage import store_down
from services.registry.context import RegistryContext, adapter_blob_key
from services.registry.db.models import Adapter, Deployment
from services.common.fields import require

DEFAULT_CHUNK, MIN_CHUNK = 1024 * 1024, 1024
# gRPC clients refuse messages above 4 MiB by default (grpcurl and plain stubs included), and a
# chunk message is its bytes plus a few of framing: 1 KiB of headroom keeps every message under it.
MAX_CHUNK = 4 * 1024 * 1024 - 1024


def _not_found(what: str) -> NotFound:
    return NotFound(f"adapter {what} not found", reason="ADAPTER_NOT_FOUND")


def find_version(session, tenant_id: str, name: str, version: int, base_model: str = "") -> Adapter | None:
    """A version of a tenant's adapter name; version 0 is the newest (for `base_model` when given)."""
    query = select(Adapter).where(Adapter.tenant_id == tenant_id, Adapter.name == name)
    if base_model:
        query = query.where(Adapter.base_model == base_model)
    if version:
        return session.scalar(query.where(Adapter.version == version))
    return session.scalar(query.order_by(Adapter.version.desc()).limit(1))


def _load(session, principal: Principal, adapter_id: str, lock: bool = False) -> Adapter:
    """`lock` (a deletion): FOR UPDATE, so a racing DeleteTenant and this call cannot both remove
    the row and announce it (tenants.py); the loser waits and then finds it gone."""
    row = session.get(Adapter, require(adapter_id, "id"), with_for_update=lock or None)
    if row is None:
        raise _not_found(f"'{adapter_id}'")
    check_owner(principal, row.tenant_id, _not_found(f"'{adapter_id}'"))
    return row


def get_adapter(ctx: RegistryContext, principal: Principal, adapter_id: str, tenant: str, name: str,
                version: int) -> Adapter:
    with ctx.db.read() as session:
        if adapter_id:
            return _load(session, principal, adapter_id)
        if not name:
            raise InvalidArgument("give an adapter id, or tenant + name (+ version)", field="name")
        owner = scoped_tenant(session, principal, tenant)
        row = find_version(session, owner.id, name, version)
        if row is None:
            raise _not_found(f"'{name}' {'v%d' % version if version else '(latest)'} of tenant '{owner.name}'")
        return row


def list_adapters(ctx: RegistryContext, principal: Principal, tenant: str, name: str, base_model: str,
                  latest_only: bool, page: paging.Page) -> tuple[list[Adapter], str]:
    with ctx.db.read() as session:
        owner = scoped_tenant(session, principal, tenant)
        query = select(Adapter).where(Adapter.tenant_id == owner.id)
        if name:
            query = query.where(Adapter.name == name)
        if base_model:
            query = query.where(Adapter.base_model == base_model)
        if latest_only:
            newer = aliased(Adapter)
            newest = select(func.max(newer.version)).where(newer.tenant_id == Adapter.tenant_id,
                                                           newer.name == Adapter.name)
            if base_model:
                newest = newest.where(newer.base_model == base_model)
            query = query.where(Adapter.version == newest.scalar_subquery())
        if page.after:
            after_name, after_version = page.after
            query = query.where(or_(Adapter.name > after_name,
                                    and_(Adapter.name == after_name, Adapter.version < after_version)))
        rows = list(session.scalars(query.order_by(Adapter.name, Adapter.version.desc()).limit(page.size + 1)))
    return paging.split(rows, page, lambda row: [row.name, row.version])


def delete_adapter(ctx: RegistryContext, principal: Principal, adapter_id: str) -> None:
    with ctx.db.write() as session:
        row = _load(session, principal, adapter_id, lock=True)
        ctx.db.lock(session, "adapter", row.tenant_id, row.name)
        users = session.scalars(select(Deployment).where(
            Deployment.tenant_id == row.tenant_id, Deployment.adapter_name == row.name,
            Deployment.base_model == row.base_model, Deployment.adapter_version.in_([0, row.version]))).all()
        pinned = [d.name for d in users if d.adapter_version == row.version]
        if pinned:
            raise FailedPrecondition(f"adapter '{row.name}' v{row.version} is pinned by deployment(s) "
                                     f"{', '.join(sorted(pinned))}; rebind or unbind them first",
                                     reason="ADAPTER_IN_USE", deployments=",".join(sorted(pinned)))
        followers = sorted(d.name for d in users if d.adapter_version == 0)
        if followers:
            others = session.scalar(select(func.count()).select_from(Adapter).where(
                Adapter.tenant_id == row.tenant_id, Adapter.name == row.name,
                Adapter.base_model == row.base_model, Adapter.id != row.id))
            if not others:
                raise FailedPrecondition(f"adapter '{row.name}' v{row.version} is the only version and deployment(s) "
                                         f"{', '.join(followers)} follow its latest; unbind them first",
                                         reason="ADAPTER_IN_USE", deployments=",".join(followers))
        session.delete(row)
        feed.record(ctx, session, feed.ADAPTER_DELETED, row.tenant_id, row.id)


def chunk_size(requested: int) -> int:
    return min(max(requested or DEFAULT_CHUNK, MIN_CHUNK), MAX_CHUNK)


class _WeightsReader:
    """The store's reader; an outage mid-stream becomes UNAVAILABLE saying how far it got."""

    def __init__(self, reader: BinaryIO, adapter_id: str) -> None:
        self._reader, self._adapter_id, self._sent = reader, adapter_id, 0

    def read(self, size: int) -> bytes:
        with store_down(lambda: f"the download of adapter '{self._adapter_id}' stopped after {self._sent} bytes of "
                                "weights; download it again from the start"):
            chunk = self._reader.read(size)
        self._sent += len(chunk)
        return chunk

    def close(self) -> None:
        self._reader.close()


def open_download(ctx: RegistryContext, principal: Principal, adapter_id: str) -> tuple[Adapter, _WeightsReader]:
    """The adapter row and a reader of its weights (the caller closes it)."""
    with ctx.db.read() as session:
        row = _load(session, principal, adapter_id)
    try:
        with store_down(f"the weights of adapter '{row.id}' could not be opened; nothing was sent"):
            return row, _WeightsReader(ctx.store.open(adapter_blob_key(row.sha256)), row.id)
    except KeyError:
        raise Unavailable(f"the blob store has no weights for adapter '{row.id}' (sha256 {row.sha256}); the store is "
                          "unreachable or was changed outside the registry", reason="BLOB_MISSING") from None
