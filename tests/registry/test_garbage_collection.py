"""Garbage collection of unreferenced blobs, and the blob-before-row ordering (every backend pair)."""

from __future__ import annotations

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.registry import feed
from services.common.rpc import error_info
from services.registry.context import adapter_blob_key
from services.registry.gc import MAX_MIN_AGE_SECONDS
from tests.registry.client import expect_error, sha256
from tests.registry.lora_files import variant


def write_orphan(registry, tmp_path, data: bytes) -> str:
    """A blob with no row: what a crash between blob write and row commit leaves."""
    path = tmp_path / "orphan"
    path.write_bytes(data)
    key = adapter_blob_key(sha256(data))
    registry.ctx.store.put_file(key, path)
    return key


def gc(registry, min_age: int = 0, dry_run: bool = False) -> pb.CollectGarbageResponse:
    return registry.admin.CollectGarbage(pb.CollectGarbageRequest(min_age_seconds=min_age, dry_run=dry_run))


def test_orphan_blobs_are_collected_and_referenced_ones_kept(registry, tenant, peft_adapter, tmp_path):
    kept = tenant.upload(variant(peft_adapter, 20), name="kept").adapter
    orphan = write_orphan(registry, tmp_path, b"orphan weights " * 100)
    assert gc(registry, min_age=3600).removed_blobs == []  # too young to be sure it is an orphan
    dry = gc(registry, dry_run=True)
    assert orphan in dry.removed_blobs and registry.ctx.store.exists(orphan)
    done = gc(registry)
    assert orphan in done.removed_blobs and done.removed_bytes >= 1500
    assert not registry.ctx.store.exists(orphan)
    assert tenant.download(kept.id)[1] == variant(peft_adapter, 20).weights
    assert gc(registry).removed_blobs == []


def test_a_min_age_above_ten_years_is_refused(registry):
    for too_old in (MAX_MIN_AGE_SECONDS + 1, 100_000_000_000, 2**64 - 1):
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, gc, registry, min_age=too_old, dry_run=True)
        assert error_info(error).metadata["field"] == "min_age_seconds" and "ten years" in error.details()
    assert gc(registry, min_age=MAX_MIN_AGE_SECONDS, dry_run=True).removed_blobs == []


def test_deleted_versions_free_their_blob_unless_shared(registry, peft_adapter):
    a, b = registry.new_tenant(), registry.new_tenant()
    shared = variant(peft_adapter, 21)
    first = a.upload(shared, name="s").adapter
    second = b.upload(shared, name="s").adapter
    a.DeleteAdapter(pb.DeleteAdapterRequest(id=first.id))
    assert adapter_blob_key(first.sha256) not in gc(registry).removed_blobs
    assert b.download(second.id)[1] == shared.weights
    b.DeleteAdapter(pb.DeleteAdapterRequest(id=second.id))
    assert gc(registry).removed_blobs == [adapter_blob_key(first.sha256)]


def test_a_crash_before_commit_leaves_an_orphan_never_a_row(registry, tenant, peft_adapter, monkeypatch):
    files = variant(peft_adapter, 22)
    before = registry.counts()

    def crash(*args, **kwargs):
        raise RuntimeError("power cut between blob write and commit")

    monkeypatch.setattr(feed, "record", crash)
    error = expect_error(grpc.StatusCode.INTERNAL, tenant.upload, files, name="crash")
    assert "error id" in error.details() and "power cut" not in error.details()
    monkeypatch.undo()
    after = registry.counts()
    assert after["adapters"] == before["adapters"] and after["blobs"] == before["blobs"] + 1
    assert gc(registry).removed_blobs == [adapter_blob_key(sha256(files.weights))]
    assert registry.counts() == {**before, "change_events": registry.counts()["change_events"]}


def test_an_upload_rewrites_a_blob_collected_under_its_feet(registry, tenant, peft_adapter, monkeypatch):
    """The store said the blob was there (an old identical orphan), then GC removed it before the
    row committed: under the blob lock the upload sees it gone and writes it again."""
    files = variant(peft_adapter, 23)
    store = registry.ctx.store
    real_exists, calls = store.exists, []

    def stale_exists(key):
        calls.append(key)
        return True if len(calls) == 1 else real_exists(key)

    monkeypatch.setattr(store, "exists", stale_exists)
    adapter = tenant.upload(files, name="race").adapter
    monkeypatch.undo()
    assert len(calls) == 2 and store.exists(adapter_blob_key(adapter.sha256))
    assert tenant.download(adapter.id)[1] == files.weights


@pytest.mark.parametrize("dry_run", [True, False])
def test_collect_garbage_is_admin_only(registry, tenant, dry_run):
    expect_error(grpc.StatusCode.PERMISSION_DENIED, tenant.CollectGarbage, pb.CollectGarbageRequest(dry_run=dry_run))
