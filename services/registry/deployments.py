"""Deployments: a public model name -> (tenant, base model, adapter name, version or latest).

Names are globally unique (they are what OpenAI clients put in `model`), but a name bound by
another tenant is reported as "taken" without saying by whom. Resolving is tenant-scoped:
another tenant's name is NOT_FOUND. "Latest" means the newest version of the adapter name
trained for the deployment's base model, so uploading a version for another base never
changes what a deployment serves. Binding takes the (tenant, adapter name) lock that
adapter deletion takes, so a bind can never land on a version being deleted.

Deployment and base model names share one namespace, the `model` clients ask for: the Router
resolves a deployment name first, so a deployment named like a base model would hide that
base model from its tenant and list it twice. Both sides refuse a name the other holds, each
under the model-name lock (MODEL_NAME_LOCK), so a bind and a registration of the same name
cannot both pass their check.
"""

from __future__ import annotations

import re

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from services.registry import feed, paging
from services.registry.adapters import find_version
from services.registry.auth import SHARE, Principal, scoped_tenant
from services.registry.base_models import MODEL_NAME_LOCK, load_base_model
from services.registry.context import RegistryContext
from services.registry.db.models import Adapter, BaseModel, Deployment, utcnow
from services.common.fields import MAX_MODEL_NAME, require

# Checked with fullmatch: `$` alone also matches before a trailing newline.
DEPLOYMENT_NAME = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9._:-]{{0,{MAX_MODEL_NAME - 1}}}$")


def _pick_adapter(session, tenant_id: str, base_model: str, adapter_name: str, version: int) -> Adapter:
    row = find_version(session, tenant_id, adapter_name, version, "" if version else base_model)
    label = f"'{adapter_name}' v{version}" if version else f"'{adapter_name}' (latest)"
    if row is None and not version and base_model and find_version(session, tenant_id, adapter_name, 0):
        raise FailedPrecondition(f"adapter {label} has no version for base model '{base_model}'",
                                 reason="BASE_MODEL_MISMATCH", field="base_model")
    if row is None:
        # A version the name does not have: the field to correct is the version, not the name.
        missing_version = version and find_version(session, tenant_id, adapter_name, 0) is not None
        raise NotFound(f"adapter {label} not found", reason="ADAPTER_NOT_FOUND",
                       field="adapter_version" if missing_version else "adapter_name")
    if base_model and row.base_model != base_model:
        raise FailedPrecondition(f"adapter {label} was trained for base model '{row.base_model}', not "
                                 f"'{base_model}'", reason="BASE_MODEL_MISMATCH", field="base_model",
                                 expected=base_model, actual=row.base_model)
    return row


def bind_deployment(ctx: RegistryContext, principal: Principal, name: str, tenant: str, base_model: str,
                    adapter_name: str, adapter_version: int, replace: bool) -> Deployment:
    if not DEPLOYMENT_NAME.fullmatch(name):
        raise InvalidArgument(f"deployment name {name!r} must be 1-128 characters of [A-Za-z0-9._:-] starting "
                              "with a letter or digit", reason="BAD_NAME", field="name", actual=name)
    if not adapter_name:
        raise InvalidArgument("adapter_name is required", reason="MISSING_FIELD", field="adapter_name")
    taken = AlreadyExists(f"deployment name '{name}' is taken", reason="DEPLOYMENT_EXISTS", field="name")
    try:
        with ctx.db.write() as session:
            # SHARE: a DeleteTenant in progress makes us wait and answer NOT_FOUND; without it the
            # insert failed the foreign key, caught below as "name is taken".
            owner = scoped_tenant(session, principal, tenant, lock=SHARE)
            ctx.db.lock(session, "adapter", owner.id, adapter_name)
            ctx.db.lock(session, MODEL_NAME_LOCK, name)
            if session.get(BaseModel, name) is not None:
                raise AlreadyExists(f"'{name}' is the name of a base model; a deployment needs a name of its own",
                                    reason="NAME_IS_BASE_MODEL", field="name")
            if base_model:
                load_base_model(session, base_model)
            adapter = _pick_adapter(session, owner.id, base_model, adapter_name, adapter_version)
            now = utcnow()
            deployment = session.get(Deployment, name)
            if deployment is not None and deployment.tenant_id != owner.id:
                raise taken
            if deployment is not None and not replace:
                raise AlreadyExists(f"deployment '{name}' is already bound; pass replace to rebind it",
                                    reason="DEPLOYMENT_EXISTS", field="name")
            if deployment is None:
                deployment = Deployment(name=name, tenant_id=owner.id, created_at=now)
                session.add(deployment)
            deployment.base_model = base_model or adapter.base_model
            deployment.adapter_name, deployment.adapter_version = adapter_name, adapter_version
            deployment.updated_at = now
            feed.record(ctx, session, feed.DEPLOYMENT_BOUND, owner.id, name)
    except IntegrityError:  # the same new name bound concurrently
        raise taken from None
    return deployment


def _owned(session, principal: Principal, name: str, tenant: str, lock: bool = False,
           any_tenant: bool = False) -> Deployment:
    """`lock` (an unbind): FOR UPDATE, so a racing DeleteTenant and the unbind cannot both remove the
    row and announce it (tenants.py); the loser waits and then finds it gone. `any_tenant`: an
    operator naming no tenant finds the name whoever owns it (names are global)."""
    require(name, "name")
    owner_id = None if any_tenant and principal.is_admin and not tenant else scoped_tenant(session, principal,
                                                                                           tenant).id
    deployment = session.get(Deployment, name, with_for_update=lock or None)
    if deployment is None or owner_id not in (None, deployment.tenant_id):
        raise NotFound(f"deployment '{name}' not found", reason="DEPLOYMENT_NOT_FOUND", field="name")
    return deployment


def unbind_deployment(ctx: RegistryContext, principal: Principal, name: str, tenant: str) -> None:
    with ctx.db.write() as session:
        deployment = _owned(session, principal, name, tenant, lock=True)
        session.delete(deployment)
        feed.record(ctx, session, feed.DEPLOYMENT_UNBOUND, deployment.tenant_id, name)


def resolve_deployment(ctx: RegistryContext, principal: Principal, name: str,
                       tenant: str) -> tuple[Deployment, Adapter, BaseModel]:
    with ctx.db.read() as session:
        deployment = _owned(session, principal, name, tenant, any_tenant=True)
        adapter = find_version(session, deployment.tenant_id, deployment.adapter_name, deployment.adapter_version,
                               deployment.base_model)
        if adapter is None:
            raise NotFound(f"deployment '{name}' points at adapter '{deployment.adapter_name}' "
                           f"v{deployment.adapter_version or 'latest'}, which does not exist",
                           reason="ADAPTER_NOT_FOUND", field="name")
        return deployment, adapter, session.get(BaseModel, deployment.base_model)


def list_deployments(ctx: RegistryContext, principal: Principal, tenant: str,
                     page: paging.Page) -> tuple[list[Deployment], str]:
    with ctx.db.read() as session:
        owner = scoped_tenant(session, principal, tenant)
        query = select(Deployment).where(Deployment.tenant_id == owner.id)
        if page.after:
            query = query.where(Deployment.name > page.after[0])
        rows = list(session.scalars(query.order_by(Deployment.name).limit(page.size + 1)))
    return paging.split(rows, page, lambda row: [row.name])
