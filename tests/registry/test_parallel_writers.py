"""20 parallel uploads and binds on SQLite and PostgreSQL: no lost or duplicate versions, and
a change feed whose order is the commit order."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from sqlalchemy import delete, func, select, text

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.registry.db.models import Adapter, Tenant
from tests.registry.client import unique
from tests.registry.lora_files import variant

PARALLEL = 20


def run_parallel(fn, items):
    with ThreadPoolExecutor(PARALLEL) as pool:
        return list(pool.map(fn, items))


def outcome(call):
    try:
        return call()
    except grpc.RpcError as error:
        return error.code()


def test_parallel_uploads_get_distinct_gapless_versions(registry_sql, peft_adapter):
    tenant = registry_sql.new_tenant()
    uploads = [variant(peft_adapter, 1000 + i) for i in range(PARALLEL)]
    before = registry_sql.counts()
    results = run_parallel(lambda files: tenant.upload(files, name="hot"), uploads)
    versions = sorted(r.adapter.version for r in results)
    assert versions == list(range(1, PARALLEL + 1)) and all(r.created for r in results)
    assert len({r.adapter.sha256 for r in results}) == PARALLEL
    listed = tenant.ListAdapters(pb.ListAdaptersRequest(name="hot")).adapters
    assert [a.version for a in listed] == list(range(PARALLEL, 0, -1))
    after = registry_sql.counts()
    assert after["adapters"] - before["adapters"] == PARALLEL and after["blobs"] - before["blobs"] == PARALLEL


def test_parallel_identical_uploads_create_one_version(registry_sql, peft_adapter):
    tenant = registry_sql.new_tenant()
    files = variant(peft_adapter, 999)
    results = run_parallel(lambda _: tenant.upload(files, name="same"), range(PARALLEL))
    assert sum(r.created for r in results) == 1
    assert {r.adapter.id for r in results} == {results[0].adapter.id} and results[0].adapter.version == 1


def test_parallel_binds(registry_sql, peft_adapter):
    tenant = registry_sql.new_tenant()
    tenant.upload(peft_adapter, name="fin")
    names = [unique("par") for _ in range(PARALLEL)]
    run_parallel(lambda n: tenant.BindDeployment(pb.BindDeploymentRequest(name=n, adapter_name="fin")), names)
    listed = tenant.ListDeployments(pb.ListDeploymentsRequest()).deployments
    assert sorted(d.name for d in listed) == sorted(names)

    contested = unique("contested")
    codes = run_parallel(lambda _: outcome(lambda: tenant.BindDeployment(
        pb.BindDeploymentRequest(name=contested, adapter_name="fin")).name), range(PARALLEL))
    assert codes.count(contested) == 1 and codes.count(grpc.StatusCode.ALREADY_EXISTS) == PARALLEL - 1
    replaced = run_parallel(lambda _: tenant.BindDeployment(
        pb.BindDeploymentRequest(name=contested, adapter_name="fin", replace=True)), range(PARALLEL))
    assert len(replaced) == PARALLEL
    assert len(tenant.ListDeployments(pb.ListDeploymentsRequest()).deployments) == PARALLEL + 1


def test_feed_order_is_commit_order_under_parallel_writers(registry_sql, peft_adapter):
    """A watcher that reads live while 20 writers commit sees exactly what a later full read sees."""
    admin, tenant = registry_sql.admin, registry_sql.new_tenant()
    tenant.upload(peft_adapter, name="fin")
    stream = admin.WatchChanges(pb.WatchChangesRequest(after_sequence=-1), timeout=60)
    start = next(stream).sequence
    uploads = [variant(peft_adapter, 2000 + i) for i in range(PARALLEL)]
    with ThreadPoolExecutor(PARALLEL) as pool:
        futures = [pool.submit(tenant.upload, files, name="feed-order") for files in uploads]
        futures += [pool.submit(tenant.BindDeployment, pb.BindDeploymentRequest(name=unique("o"),
                                                                                adapter_name="fin"))
                    for _ in range(PARALLEL)]
        live = [next(stream).sequence for _ in range(2 * PARALLEL)]
        for future in futures:
            future.result()
    stream.cancel()
    replay = admin.WatchChanges(pb.WatchChangesRequest(after_sequence=start), timeout=60)
    next(replay)
    again = [next(replay).sequence for _ in range(2 * PARALLEL)]
    replay.cancel()
    assert live == sorted(set(live)) and live == again


def test_an_upload_racing_a_tenant_deletion_is_not_found(registry_sql, peft_adapter):
    """PostgreSQL: an upload committing while DeleteTenant holds the tenant row used to fail its
    foreign key check after the delete committed, as INTERNAL. (SQLite serializes all writers.)"""
    if not registry_sql.backend.startswith("postgres"):
        pytest.skip("SQLite writers never overlap")
    tenant = registry_sql.new_tenant()
    db = registry_sql.ctx.db
    with ThreadPoolExecutor(1) as pool:
        with db.write() as session:  # what DeleteTenant does, held open until the upload waits on it
            session.execute(delete(Tenant).where(Tenant.id == tenant.tenant_id))
            upload = pool.submit(outcome, lambda: registry_sql.admin.upload(peft_adapter, name="late",
                                                                            tenant=tenant.tenant_id))
            with db.engine.connect() as watcher:
                for _ in range(600):  # until the upload's transaction waits for our row lock
                    if watcher.execute(text("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                            "AND datname = current_database()")).scalar():
                        break
                    watcher.rollback()
                    time.sleep(0.1)
                else:
                    raise AssertionError("the upload never waited for the tenant row")
        assert upload.result() == grpc.StatusCode.NOT_FOUND
    with db.read() as session:
        left = session.scalar(select(func.count()).select_from(Adapter).where(Adapter.tenant_id == tenant.tenant_id))
    assert left == 0
