"""The change feed: position marker, history, live events, resumption, filters, retention,
and events written by another registry process on the same database (both databases)."""

from __future__ import annotations

import datetime as dt
import threading

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from tests.registry.backends import InProcessRegistry
from tests.registry.client import Client, expect_error, unique

K = pb.ChangeKind


def watch(client: Client, after: int, kinds=()):
    return client.WatchChanges(pb.WatchChangesRequest(after_sequence=after, kinds=kinds), timeout=30)


def take(stream, count: int) -> list[pb.ChangeEvent]:
    return [next(stream) for _ in range(count)]


def head(client: Client) -> int:
    stream = watch(client, -1)
    marker = next(stream)
    stream.cancel()
    assert marker.is_position_marker
    return marker.sequence


def make_changes(registry, tenant: Client, count: int) -> list[str]:
    names = [unique("feed") for _ in range(count)]
    for name in names:
        tenant.BindDeployment(pb.BindDeploymentRequest(name=name, adapter_name="fin"))
    return names


@pytest.fixture
def feed_tenant(registry_sql, peft_adapter) -> Client:
    tenant = registry_sql.new_tenant()
    tenant.upload(peft_adapter, name="fin")
    return tenant


def test_marker_then_history_then_live_events(registry_sql, feed_tenant):
    admin = registry_sql.admin
    start = head(admin)
    names = make_changes(registry_sql, feed_tenant, 3)
    stream = watch(admin, start)
    marker, *history = take(stream, 4)
    assert marker.is_position_marker and marker.sequence == start and not marker.kind
    assert [(e.kind, e.subject, e.tenant_id) for e in history] == \
        [(K.CHANGE_KIND_DEPLOYMENT_BOUND, n, feed_tenant.tenant_id) for n in names]
    sequences = [e.sequence for e in history]
    assert sequences == sorted(set(sequences)) and sequences[0] > start
    live = threading.Timer(0.3, make_changes, (registry_sql, feed_tenant, 1))
    live.start()
    (event,) = take(stream, 1)
    live.join()
    assert event.kind == K.CHANGE_KIND_DEPLOYMENT_BOUND and event.sequence > sequences[-1]
    stream.cancel()


def test_a_reconnecting_client_misses_nothing(registry_sql, feed_tenant):
    admin = registry_sql.admin
    start = head(admin)
    first = make_changes(registry_sql, feed_tenant, 2)
    stream = watch(admin, start)
    seen = take(stream, 3)[1:]
    stream.cancel()  # the client goes away...
    missed = make_changes(registry_sql, feed_tenant, 3)  # ...while changes keep coming
    stream = watch(admin, seen[-1].sequence)  # and resumes after the last sequence it saw
    marker, *resumed = take(stream, 4)
    stream.cancel()
    assert marker.sequence == seen[-1].sequence
    assert [e.subject for e in seen] == first and [e.subject for e in resumed] == missed
    assert resumed[0].sequence > seen[-1].sequence


def test_kinds_filter_and_bad_cursors(registry_sql, feed_tenant):
    admin = registry_sql.admin
    start = head(admin)
    name = make_changes(registry_sql, feed_tenant, 1)[0]
    feed_tenant.UnbindDeployment(pb.UnbindDeploymentRequest(name=name))
    stream = watch(admin, start, kinds=[K.CHANGE_KIND_DEPLOYMENT_UNBOUND])
    marker, event = take(stream, 2)
    stream.cancel()
    assert event.kind == K.CHANGE_KIND_DEPLOYMENT_UNBOUND and event.subject == name
    error = expect_error(grpc.StatusCode.OUT_OF_RANGE, lambda: list(watch(admin, start + 1000)))
    assert "ahead of the feed" in error.details()
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(watch(admin, -5)))
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(watch(admin, 0, kinds=[K.CHANGE_KIND_UNSPECIFIED])))


def test_cursors_older_than_the_retained_history_are_out_of_range(registry_sql, feed_tenant):
    admin, ctx = registry_sql.admin, registry_sql.ctx
    make_changes(registry_sql, feed_tenant, 2)
    newest = head(admin)
    retention = ctx.change_retention
    ctx.change_retention = dt.timedelta(0)
    try:
        admin.CollectGarbage(pb.CollectGarbageRequest(min_age_seconds=3600))  # also prunes the feed
    finally:
        ctx.change_retention = retention
    error = expect_error(grpc.StatusCode.OUT_OF_RANGE, lambda: list(watch(admin, 0)))
    assert "older than the retained history" in error.details() and "after_sequence = -1" in error.details()
    assert head(admin) == newest  # the newest event is kept, so the head survives pruning
    stream = watch(admin, newest - 1)  # the first cursor still served
    assert take(stream, 2)[1].sequence == newest
    stream.cancel()


def test_events_from_another_registry_process_arrive_by_polling(registry_sql, feed_tenant, tmp_path):
    """Two registry processes on one database: a watcher on one sees commits made through the other."""
    config = registry_sql.config
    other = InProcessRegistry(type(config)(**{**config.__dict__, "port": 0, "data_dir": tmp_path,
                                              "database_url": config.effective_database_url})).start()
    try:
        admin = registry_sql.admin
        start = head(admin)
        via_other = Client(other.stub, feed_tenant.token)
        stream = watch(admin, start)
        assert next(stream).is_position_marker
        threading.Timer(0.3, lambda: via_other.BindDeployment(
            pb.BindDeploymentRequest(name="from-the-other-process-" + registry_sql.backend, adapter_name="fin"))
        ).start()
        (event,) = take(stream, 1)
        stream.cancel()
        assert event.subject == "from-the-other-process-" + registry_sql.backend
    finally:
        other.stop()
