"""PostgreSQL: writers racing DeleteTenant. Every writer that adds rows under a tenant takes the
tenant row FOR SHARE and DeleteTenant takes it FOR UPDATE first, so a racing writer either
finishes before the deletion reads what to delete (and gets its deletion event) or waits and
answers NOT_FOUND with nothing written. (SQLite serializes all writers: nothing to race.)

Each test holds a lock in a transaction of its own, waits (on pg_stat_activity, not on time)
until the call under test is blocked behind it, then lets go."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from sqlalchemy import delete, func, select, text

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.rpc import error_info
from services.registry import feed
from services.registry.db.models import Adapter, ApiKey, ChangeEvent, Deployment, Tenant
from tests.registry.client import unique
from tests.registry.lora_files import variant


@pytest.fixture
def registry_pg(registry_sql):
    if not registry_sql.backend.startswith("postgres"):
        pytest.skip("SQLite writers never overlap")
    return registry_sql


def outcome(call):
    """The call's result, or (status code, ErrorInfo reason) when it fails."""
    try:
        return call()
    except grpc.RpcError as error:
        info = error_info(error)
        return error.code(), info.reason if info else ""


def lock_waiters(db) -> int:
    with db.engine.connect() as watcher:
        return watcher.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                    "AND datname = current_database()")).scalar()


def wait_until(condition, what: str) -> None:
    for _ in range(600):
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"gave up waiting until {what}")


def racing_a_deleted_tenant(registry, tenant_id: str, call):
    """Runs `call` while another transaction has deleted the tenant row but not committed yet."""
    db = registry.ctx.db
    with ThreadPoolExecutor(1) as pool:
        with db.write() as session:  # what DeleteTenant does, held open until the call waits on it
            session.execute(delete(Tenant).where(Tenant.id == tenant_id))
            future = pool.submit(outcome, call)
            wait_until(lambda: lock_waiters(db) >= 1, "the call waits for the tenant row")
        return future.result()


def rows_of(registry, model, tenant_id: str) -> int:
    with registry.ctx.db.read() as session:
        return session.scalar(select(func.count()).select_from(model).where(model.tenant_id == tenant_id))


def test_create_api_key_racing_a_tenant_deletion_is_not_found(registry_pg):
    """Used to fail the api_keys foreign key after the deletion committed: INTERNAL."""
    tenant = registry_pg.new_tenant()
    result = racing_a_deleted_tenant(registry_pg, tenant.tenant_id, lambda: registry_pg.admin.CreateApiKey(
        pb.CreateApiKeyRequest(tenant=tenant.tenant_id, name="late")))
    assert result == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")
    assert rows_of(registry_pg, ApiKey, tenant.tenant_id) == 0


@pytest.mark.parametrize("caller", ["admin", "tenant key"])
def test_bind_racing_a_tenant_deletion_is_not_found(registry_pg, peft_adapter, caller):
    """Used to catch the deployments foreign key failure as "deployment name is taken"."""
    tenant = registry_pg.new_tenant()
    tenant.upload(peft_adapter, name="fin")
    client, ref = (registry_pg.admin, tenant.tenant_id) if caller == "admin" else (tenant, "")
    result = racing_a_deleted_tenant(registry_pg, tenant.tenant_id, lambda: client.BindDeployment(
        pb.BindDeploymentRequest(tenant=ref, name=unique("late"), adapter_name="fin")))
    assert result == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")
    assert rows_of(registry_pg, Deployment, tenant.tenant_id) == 0


def test_tenant_deletion_emits_adapter_deleted_for_every_adapter_it_removes(registry_pg, peft_adapter):
    """An upload that committed after DeleteTenant read the tenant's adapters but before it deleted
    them used to be deleted with them, with no ADAPTER_DELETED event: caches kept serving it."""
    admin, tenant = registry_pg.admin, registry_pg.new_tenant()
    tenant.upload(peft_adapter, name="fin")
    tenant.BindDeployment(pb.BindDeploymentRequest(name=unique("dep"), adapter_name="fin"))
    db = registry_pg.ctx.db
    with ThreadPoolExecutor(2) as pool:
        with db.write() as session:  # holds the deployment rows: DeleteTenant stops at deleting them
            session.execute(select(Deployment.name).where(Deployment.tenant_id == tenant.tenant_id)
                            .with_for_update())
            deletion = pool.submit(outcome, lambda: admin.DeleteTenant(
                pb.DeleteTenantRequest(tenant=tenant.tenant_id, force=True)))
            wait_until(lambda: lock_waiters(db) >= 1, "DeleteTenant waits for the deployment rows")
            upload = pool.submit(outcome, lambda: admin.upload(variant(peft_adapter, 77), name="late",
                                                               tenant=tenant.tenant_id))
            wait_until(lambda: upload.done() or lock_waiters(db) >= 2, "the upload finished or waits")
        assert deletion.result() == pb.DeleteTenantResponse()
        late = upload.result()
    with db.read() as session:
        events = session.execute(select(ChangeEvent.kind, ChangeEvent.subject)
                                 .where(ChangeEvent.tenant_id == tenant.tenant_id)).all()
    created = {subject for kind, subject in events if kind == feed.ADAPTER_CREATED}
    deleted = {subject for kind, subject in events if kind == feed.ADAPTER_DELETED}
    assert deleted == created
    assert late == (grpc.StatusCode.NOT_FOUND, "TENANT_NOT_FOUND")  # it waited for the deletion
    assert rows_of(registry_pg, Adapter, tenant.tenant_id) == 0
