"""A down S3 endpoint: every RPC that needs blobs answers UNAVAILABLE (retryable) naming the
endpoint and what was done, and leaves no row without its blob and no scratch files.

The outage is real: a private moto server stopped after the registry started (connection
refused), or a proxy that drops the connection in the middle of a download. These used to
end in INTERNAL.
"""

from __future__ import annotations

import grpc
import pytest
from sqlalchemy import func, select

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.rpc import error_info
from services.registry.db.models import Adapter
from tests.registry.backends import CuttableProxy, MotoS3
from tests.registry.client import bearer, expect_error, sha256
from tests.registry.conftest import start_registry
from tests.registry.lora_files import variant
from tests.registry.s3_uploads import leave_upload


@pytest.fixture
def s3(tmp_path, request, tiny_model_dir):
    """(registry, its private moto server): stop the server to take the store down."""
    moto = MotoS3(tmp_path / "moto.log").start()
    registry = start_registry("sqlite-s3", tmp_path / "registry", request, tiny_model_dir, s3_endpoint=moto.endpoint)
    yield registry, moto
    registry.stop()
    moto.stop()


def adapter_rows(registry) -> int:
    with registry.ctx.db.read() as session:
        return session.scalar(select(func.count()).select_from(Adapter))


def assert_store_down(error: grpc.RpcError, endpoint: str, *phrases: str) -> None:
    assert "the blob store is down" in error.details() and endpoint in error.details(), error.details()
    assert "retry later" in error.details()
    for phrase in phrases:
        assert phrase in error.details(), error.details()
    info = error_info(error)
    assert info.reason == "BLOB_STORE_UNAVAILABLE" and info.metadata["endpoint"] == endpoint


def test_upload_while_the_store_is_down_stores_nothing(s3, peft_adapter):
    registry, moto = s3
    tenant = registry.new_tenant()
    moto.stop()
    error = expect_error(grpc.StatusCode.UNAVAILABLE, tenant.upload, peft_adapter, name="fin")
    assert_store_down(error, moto.endpoint, "adapter 'fin' was validated but not stored",
                      "scratch files were removed")
    assert adapter_rows(registry) == 0 and list(registry.ctx.spool_dir.iterdir()) == []
    assert tenant.ListAdapters(pb.ListAdaptersRequest()).adapters == []


def test_store_failing_after_the_blob_write_commits_no_row(s3, peft_adapter, monkeypatch):
    """The blob went up, then the store died before the row: the re-check under the blob lock
    fails, the transaction rolls back, and the blob is an orphan for garbage collection."""
    registry, moto = s3
    tenant, store = registry.new_tenant(), registry.ctx.store
    written = []

    def put_then_die(key, path):
        type(store).put_file(store, key, path)
        written.append(key)
        moto.stop()

    monkeypatch.setattr(store, "put_file", put_then_die)
    error = expect_error(grpc.StatusCode.UNAVAILABLE, tenant.upload, peft_adapter, name="fin")
    assert_store_down(error, moto.endpoint, "no version was created")
    assert written and adapter_rows(registry) == 0 and list(registry.ctx.spool_dir.iterdir()) == []


def test_download_while_the_store_is_down_sends_nothing(s3, peft_adapter):
    registry, moto = s3
    tenant = registry.new_tenant()
    adapter = tenant.upload(peft_adapter, name="fin").adapter
    moto.stop()
    received = []
    with pytest.raises(grpc.RpcError) as caught:
        for message in registry.stub.DownloadAdapter(pb.DownloadAdapterRequest(id=adapter.id),
                                                     metadata=bearer(tenant.token), timeout=60):
            received.append(message)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert_store_down(caught.value, moto.endpoint, "could not be opened; nothing was sent")
    assert received == []


def test_download_cut_mid_stream_ends_unavailable(tmp_path, request, tiny_model_dir, moto, peft_adapter):
    proxy = CuttableProxy(moto.endpoint)
    registry = start_registry("sqlite-s3", tmp_path, request, tiny_model_dir, s3_endpoint=proxy.endpoint)
    try:
        tenant = registry.new_tenant()
        files = variant(peft_adapter, 7)
        adapter = tenant.upload(files, name="fin").adapter
        assert len(files.weights) > 8192
        proxy.stall_after(4096)  # the GET's headers and the first few KiB of weights, then silence
        stream = registry.stub.DownloadAdapter(pb.DownloadAdapterRequest(id=adapter.id, chunk_size=1024),
                                               metadata=bearer(tenant.token), timeout=60)
        assert next(stream).manifest.sha256 == sha256(files.weights)
        received = next(stream).chunk
        proxy.cut()
        with pytest.raises(grpc.RpcError) as caught:
            for message in stream:
                received += message.chunk
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value.details()
        assert_store_down(caught.value, proxy.endpoint, f"the download of adapter '{adapter.id}' stopped after",
                          "download it again from the start")
        assert 0 < len(received) < len(files.weights) and files.weights.startswith(received)
    finally:
        registry.stop()
        proxy.cut()


def test_deletes_never_touch_the_store_so_they_work_while_it_is_down(s3, peft_adapter):
    """Rows only: weights may be shared, so they wait for garbage collection in any case."""
    registry, moto = s3
    tenant = registry.new_tenant()
    first = tenant.upload(peft_adapter, name="a").adapter
    tenant.upload(variant(peft_adapter, 3), name="b")
    moto.stop()
    tenant.DeleteAdapter(pb.DeleteAdapterRequest(id=first.id))
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.GetAdapter, pb.GetAdapterRequest(id=first.id))
    registry.admin.DeleteTenant(pb.DeleteTenantRequest(tenant=tenant.tenant_id, force=True))
    assert adapter_rows(registry) == 0


@pytest.mark.parametrize("dry_run", [False, True])
def test_garbage_collection_while_the_store_is_down(s3, dry_run):
    registry, moto = s3
    moto.stop()
    error = expect_error(grpc.StatusCode.UNAVAILABLE, registry.admin.CollectGarbage,
                         pb.CollectGarbageRequest(dry_run=dry_run))
    assert_store_down(error, moto.endpoint, "garbage collection removed 0 unreferenced blob(s)",
                      "no adapter row was changed")


def test_garbage_collection_says_how_far_it_got(s3, peft_adapter, tmp_path, monkeypatch):
    registry, moto = s3
    tenant, store = registry.new_tenant(), registry.ctx.store
    kept = tenant.upload(peft_adapter, name="kept").adapter
    for index in range(2):
        path = tmp_path / f"orphan-{index}"
        path.write_bytes(b"orphan %d" % index)
        store.put_file(f"adapters/{sha256(path.read_bytes())}", path)

    def delete_then_die(key):
        type(store).delete(store, key)
        moto.stop()

    monkeypatch.setattr(store, "delete", delete_then_die)
    error = expect_error(grpc.StatusCode.UNAVAILABLE, registry.admin.CollectGarbage, pb.CollectGarbageRequest())
    assert_store_down(error, moto.endpoint, "garbage collection removed 1 unreferenced blob(s)")
    assert tenant.GetAdapter(pb.GetAdapterRequest(id=kept.id)).id == kept.id


def test_garbage_collection_says_how_many_stale_uploads_it_aborted(s3, monkeypatch):
    """moto dates every upload 2010-11-10, so both are older than the default 24 h."""
    registry, moto = s3
    store = registry.ctx.store
    for digest in ("ab" * 32, "cd" * 32):
        leave_upload(store, f"adapters/{digest}")

    def abort_then_die(upload):
        aborted = type(store).abort_upload(store, upload)
        moto.stop()
        return aborted

    monkeypatch.setattr(store, "abort_upload", abort_then_die)
    error = expect_error(grpc.StatusCode.UNAVAILABLE, registry.admin.CollectGarbage, pb.CollectGarbageRequest())
    assert_store_down(error, moto.endpoint, "removed 0 unreferenced blob(s) and aborted 1 stale upload(s)")
