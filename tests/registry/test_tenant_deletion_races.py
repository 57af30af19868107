"""PostgreSQL: writers racing DeleteTenant. Every writer that adds rows under a tenant takes the
tenant row FOR SHARE and DeleteTenant takes it FOR UPDATE first, so a racing writer either
finishes before the deletion reads what to delete (and gets its deletion event) or waits and
answers NOT_FOUND with nothing written. Deletions racing DeleteTenant (DeleteAdapter,
UnbindDeployment, RevokeApiKey) leave each object's deletion event in the feed exactly once.
SQLite serializes all writers, so only the free-running race runs there too.

Each choreographed test holds a lock in a transaction of its own, waits (on pg_stat_activity,
not on time) until the call under test is blocked behind it, then lets go."""

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


# --- Deletion events racing DeleteTenant: each removed object's event exactly once ---

DELETION_KINDS = {pb.CHANGE_KIND_ADAPTER_DELETED, pb.CHANGE_KIND_DEPLOYMENT_UNBOUND, pb.CHANGE_KIND_API_KEY_REVOKED}


def feed_head(admin) -> int:
    stream = admin.WatchChanges(pb.WatchChangesRequest(after_sequence=-1), timeout=30)
    marker = next(stream)
    stream.cancel()
    return marker.sequence


def deletions_in_feed(admin, tenant_id: str, start: int) -> list[tuple[int, str]]:
    """(kind, subject) of every deletion event of the tenant that WatchChanges carried after `start`."""
    end, seen = feed_head(admin), []
    stream = admin.WatchChanges(pb.WatchChangesRequest(after_sequence=start), timeout=30)
    assert next(stream).is_position_marker
    while end > start:
        event = next(stream)
        if event.tenant_id == tenant_id and event.kind in DELETION_KINDS:
            seen.append((event.kind, event.subject))
        if event.sequence >= end:
            break
    stream.cancel()
    return seen


class DoomedTenant:
    """A tenant with two adapters, two deployments and two keys; the race deletes one of each."""

    def __init__(self, registry, peft_adapter) -> None:
        self.admin, self.client = registry.admin, registry.new_tenant()
        self.id = self.client.tenant_id
        fin = self.client.upload(peft_adapter, name="fin").adapter.id
        self.spare = self.client.upload(peft_adapter, name="spare").adapter.id  # no deployment needs it
        self.deployments = [unique("dep") for _ in range(2)]
        for name in self.deployments:
            self.client.BindDeployment(pb.BindDeploymentRequest(name=name, adapter_name="fin"))
        self.extra_key = self.admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=self.id, name="extra")).key.id
        with registry.ctx.db.read() as session:
            keys = set(session.scalars(select(ApiKey.id).where(ApiKey.tenant_id == self.id)))
        self.expected = sorted([(pb.CHANGE_KIND_ADAPTER_DELETED, a) for a in (fin, self.spare)]
                               + [(pb.CHANGE_KIND_DEPLOYMENT_UNBOUND, d) for d in self.deployments]
                               + [(pb.CHANGE_KIND_API_KEY_REVOKED, k) for k in keys])
        self.start = feed_head(self.admin)

    def delete_one(self, kind: str):
        """The single-object deletion of `kind`, as a call returning its outcome."""
        calls = {"DeleteAdapter": lambda: self.admin.DeleteAdapter(pb.DeleteAdapterRequest(id=self.spare)),
                 "UnbindDeployment": lambda: self.admin.UnbindDeployment(
                     pb.UnbindDeploymentRequest(tenant=self.id, name=self.deployments[0])),
                 "RevokeApiKey": lambda: self.admin.RevokeApiKey(pb.RevokeApiKeyRequest(key_id=self.extra_key))}
        return lambda: outcome(calls[kind])

    def delete_tenant(self):
        return outcome(lambda: self.admin.DeleteTenant(pb.DeleteTenantRequest(tenant=self.id, force=True)))

    def deletions(self) -> list[tuple[int, str]]:
        return sorted(deletions_in_feed(self.admin, self.id, self.start))


SINGLE_DELETIONS = ["DeleteAdapter", "UnbindDeployment", "RevokeApiKey"]


def done_or_gone(result) -> bool:
    """A single deletion that lost the race answers NOT_FOUND; anything else is a bug."""
    return not isinstance(result, tuple) or result[0] == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("kind", SINGLE_DELETIONS)
def test_deletion_inside_a_tenant_deletion_is_in_the_feed_once(registry_pg, peft_adapter, kind):
    """DeleteTenant has read what to delete and waits on the deployment rows when the single deletion
    runs. It used to emit events from that read, so an object the single call removed (and announced)
    meanwhile was announced a second time."""
    doomed, db = DoomedTenant(registry_pg, peft_adapter), registry_pg.ctx.db
    with ThreadPoolExecutor(2) as pool:
        with db.write() as session:
            session.execute(select(Deployment.name).where(Deployment.tenant_id == doomed.id).with_for_update())
            deletion = pool.submit(doomed.delete_tenant)
            wait_until(lambda: lock_waiters(db) >= 1, "DeleteTenant waits for the deployment rows")
            single = pool.submit(doomed.delete_one(kind))
            wait_until(lambda: single.done() or lock_waiters(db) >= 2, "the single deletion finished or waits")
        assert deletion.result() == pb.DeleteTenantResponse()
        assert done_or_gone(single.result()), single.result()
    assert doomed.deletions() == doomed.expected


@pytest.mark.parametrize("kind", SINGLE_DELETIONS)
def test_tenant_deletion_inside_a_deletion_is_in_the_feed_once(registry_pg, peft_adapter, kind):
    """The single deletion has removed its row and waits for the feed lock when DeleteTenant reads what
    to delete (the row is still committed) and then waits on that row. It used to announce the object
    again after the single deletion committed."""
    doomed, db = DoomedTenant(registry_pg, peft_adapter), registry_pg.ctx.db
    with ThreadPoolExecutor(2) as pool:
        with db.write() as session:
            db.lock(session, "feed")
            single = pool.submit(doomed.delete_one(kind))
            wait_until(lambda: lock_waiters(db) >= 1, "the single deletion waits for the feed lock")
            deletion = pool.submit(doomed.delete_tenant)
            wait_until(lambda: lock_waiters(db) >= 2, "DeleteTenant waits for the single deletion's row")
        assert not isinstance(single.result(), tuple)  # it got there first: it succeeds
        assert deletion.result() == pb.DeleteTenantResponse()
    assert doomed.deletions() == doomed.expected


def test_deletions_racing_a_tenant_deletion_are_each_in_the_feed_once(registry_sql, peft_adapter):
    """Every single deletion at once with DeleteTenant, on both databases: whatever the interleaving,
    each object's deletion event is in the feed exactly once, and none is missing."""
    doomed = DoomedTenant(registry_sql, peft_adapter)
    calls = [doomed.delete_one(kind) for kind in SINGLE_DELETIONS] + [doomed.delete_tenant]
    with ThreadPoolExecutor(len(calls)) as pool:
        results = list(pool.map(lambda call: call(), calls))
    assert results[-1] == pb.DeleteTenantResponse()
    assert all(done_or_gone(r) for r in results[:-1]), results
    assert doomed.deletions() == doomed.expected
