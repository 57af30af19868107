"""Garbage collection of unreferenced blobs, and the blob-before-row ordering (every backend pair);
stale incomplete S3 uploads of adapter blobs aborted, and nothing else in the bucket touched."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.registry import feed
from services.common.rpc import error_info
from services.registry.context import adapter_blob_key
from services.registry.config import MAX_STALE_UPLOAD_HOURS, RegistryConfig
from services.registry.db.models import utcnow
from services.registry.gc import MAX_MIN_AGE_SECONDS
from tests.registry.client import expect_error, sha256
from tests.registry.conftest import start_registry
from tests.registry.lora_files import variant
from tests.registry.s3_uploads import incomplete_keys, leave_upload


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


@pytest.fixture
def s3_registry(request, tmp_path, tiny_model_dir):
    """A registry on moto whose --s3-stale-upload-hours is the test's parameter."""
    registry = start_registry("sqlite-s3", tmp_path, request, tiny_model_dir, s3_stale_upload_hours=request.param)
    yield registry
    registry.stop()


@pytest.mark.parametrize("s3_registry", [0], indirect=True)
def test_stale_incomplete_uploads_of_adapter_blobs_are_aborted_and_nothing_else(s3_registry):
    """An upload cut off by an S3 outage used to keep its parts (and their storage) forever."""
    store = s3_registry.ctx.store
    ours = [adapter_blob_key("ab" * 32), adapter_blob_key("cd" * 32)]
    # Never ours to abort: the Trainer's prefix, a look-alike prefix, and a key no upload of ours has.
    others = ["datasets/" + "ab" * 32, "adaptersx/" + "ab" * 32, "adapters/notes/readme"]
    for key in ours + others:
        leave_upload(store, key)
    assert gc(s3_registry, dry_run=True) == pb.CollectGarbageResponse()
    assert incomplete_keys(store) == sorted(ours + others)  # a dry run aborts nothing
    assert gc(s3_registry) == pb.CollectGarbageResponse()  # no object was removed: none existed
    assert incomplete_keys(store) == sorted(others)
    assert gc(s3_registry) == pb.CollectGarbageResponse() and incomplete_keys(store) == sorted(others)


@pytest.mark.parametrize("s3_registry", [MAX_STALE_UPLOAD_HOURS], indirect=True)
def test_incomplete_uploads_younger_than_the_stale_age_are_kept(s3_registry):
    """The age decides. moto dates every upload 2010-11-10 (a fixed Initiated), so the age that
    keeps one there is the longest allowed; against real S3 the default 24 h does the same."""
    store = s3_registry.ctx.store
    key = adapter_blob_key("ef" * 32)
    leave_upload(store, key)
    (upload,) = store.incomplete_uploads("adapters")
    assert upload.initiated_at > utcnow() - dt.timedelta(hours=MAX_STALE_UPLOAD_HOURS)
    gc(s3_registry)
    assert incomplete_keys(store) == [key]


@pytest.mark.parametrize("hours", [-1, MAX_STALE_UPLOAD_HOURS + 1, float("nan")])
def test_a_stale_upload_age_out_of_range_is_refused(tmp_path, hours):
    with pytest.raises(ValueError, match="--s3-stale-upload-hours must be between 0 and"):
        RegistryConfig(data_dir=tmp_path, s3_stale_upload_hours=hours)
