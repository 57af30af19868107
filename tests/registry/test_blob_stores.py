"""Both blob stores through the one interface: atomic puts, reads, listing, deletion, and S3
multipart uploads (incomplete ones listed and aborted) and bucket creation against moto's S3
server; an S3 endpoint that refuses, never answers or answers 5xx is BlobStoreUnavailable,
within bounded timeouts and retries."""

from __future__ import annotations

import datetime as dt
import http.server
import os
import socket
import threading
from pathlib import Path

import pytest
import urllib3
from minio.error import S3Error

from services.registry.blobstore import LocalBlobStore, S3BlobStore
from services.registry.blobstore.base import BlobStoreUnavailable, IncompleteUpload, check_key
from services.registry.blobstore.s3 import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, RETRIES
from tests.conftest import free_port
from tests.registry.client import unique
from tests.registry.s3_uploads import incomplete_keys, leave_upload


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        store = LocalBlobStore(tmp_path / "blobs")
    else:
        moto = request.getfixturevalue("moto")
        store = S3BlobStore(moto.endpoint, unique("bucket"), "test", "test", region="us-east-1", secure=False,
                            part_size=5 * 1024 * 1024)
    store.start()
    store.start()  # idempotent: the folder or bucket already exists
    yield store
    store.close()


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / f"src-{len(data)}"
    path.write_bytes(data)
    return path


def test_put_read_list_delete(store, tmp_path):
    small, large = b"hello" * 10, os.urandom(12 * 1024 * 1024)  # large is multipart on S3 (5 MiB parts)
    store.put_file("adapters/aa", write(tmp_path, small))
    store.put_file("adapters/bb", write(tmp_path, large))
    store.put_file("other/cc", write(tmp_path, b"x"))
    assert store.exists("adapters/aa") and not store.exists("adapters/zz")
    with store.open("adapters/bb") as reader:
        chunks = iter(lambda: reader.read(1 << 20), b"")
        assert b"".join(chunks) == large
    listed = {info.key: info.size for info in store.list("adapters")}
    assert listed == {"adapters/aa": len(small), "adapters/bb": len(large)}
    assert all(info.modified_at.tzinfo is not None for info in store.list("adapters"))
    store.delete("adapters/aa")
    store.delete("adapters/aa")  # missing is fine
    assert not store.exists("adapters/aa")
    with pytest.raises(KeyError):
        store.open("adapters/aa")


def test_s3_large_objects_go_up_in_parts(moto, tmp_path):
    store = S3BlobStore(moto.endpoint, unique("bucket"), "k", "s", region="us-east-1", secure=False,
                        part_size=5 * 1024 * 1024)
    store.start()
    assert store.client.bucket_exists(store.bucket)
    store.put_file("adapters/big", write(tmp_path, os.urandom(11 * 1024 * 1024)))
    assert store.client.stat_object(store.bucket, "adapters/big").etag.endswith("-3")  # 3 parts


def test_s3_incomplete_uploads_are_listed_under_their_prefix_only_and_aborted(moto):
    store = S3BlobStore(moto.endpoint, unique("bucket"), "k", "s", region="us-east-1", secure=False,
                        part_size=5 * 1024 * 1024)
    store.start()
    first, second = leave_upload(store, "adapters/aa"), leave_upload(store, "adapters/aa")
    for other in ("datasets/aa", "adaptersx/aa"):  # another prefix, and one that merely starts the same
        leave_upload(store, other)
    listed = list(store.incomplete_uploads("adapters"))
    assert sorted((u.key, u.upload_id) for u in listed) == sorted([("adapters/aa", first), ("adapters/aa", second)])
    assert all(u.initiated_at.tzinfo is not None for u in listed)
    store.abort_upload(IncompleteUpload("adapters/aa", first, listed[0].initiated_at))
    store.abort_upload(IncompleteUpload("adapters/aa", first, listed[0].initiated_at))  # gone already: fine
    assert [u.upload_id for u in store.incomplete_uploads("adapters")] == [second]
    assert incomplete_keys(store) == ["adapters/aa", "adaptersx/aa", "datasets/aa"]
    assert not store.exists("adapters/aa")  # an incomplete upload never was an object


def test_s3_credentials_without_the_multipart_permissions_skip_the_aborts(moto, monkeypatch):
    """Credentials scoped before garbage collection aborted uploads must not make it fail. moto
    grants everything, so the refusal S3 answers (403 AccessDenied) is raised at minio's call."""
    store = S3BlobStore(moto.endpoint, unique("bucket"), "k", "s", region="us-east-1", secure=False,
                        part_size=5 * 1024 * 1024)
    store.start()
    upload_id = leave_upload(store, "adapters/aa")
    listed = list(store.incomplete_uploads("adapters"))

    def denied(*args, **kwargs):
        raise S3Error(urllib3.HTTPResponse(status=403), "AccessDenied", "Access Denied", None, None, None)

    monkeypatch.setattr(store.client, "_abort_multipart_upload", denied)
    assert store.abort_upload(listed[0]) is False
    monkeypatch.setattr(store.client, "_list_multipart_uploads", denied)
    assert list(store.incomplete_uploads("adapters")) == []
    monkeypatch.undo()
    assert [u.upload_id for u in store.incomplete_uploads("adapters")] == [upload_id]  # kept, not half-aborted


def test_the_local_store_has_no_incomplete_uploads(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    store.start()
    assert list(store.incomplete_uploads("adapters")) == []


def test_local_put_is_atomic_and_leaves_no_temp_file(tmp_path):
    store = LocalBlobStore(tmp_path / "blobs")
    store.start()
    with pytest.raises(FileNotFoundError):
        store.put_file("adapters/missing", tmp_path / "does-not-exist")
    assert not store.exists("adapters/missing") and not list((tmp_path / "blobs" / ".tmp").iterdir())
    (tmp_path / "blobs" / ".tmp" / "left-by-a-crash").write_bytes(b"partial")
    assert store.sweep_temp(0) == 7 and not list((tmp_path / "blobs" / ".tmp").iterdir())


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs", "a//b", "UPPER", "a/../b", ""])
def test_keys_are_our_own_shape_only(key):
    with pytest.raises(ValueError):
        check_key(key)


def s3_store(endpoint: str, **limits) -> S3BlobStore:
    return S3BlobStore(endpoint, "bucket", "k", "s", region="us-east-1", secure=False, part_size=5 * 1024 * 1024,
                       **limits)


def every_call(store: S3BlobStore, tmp_path: Path):
    source = write(tmp_path, b"weights")
    return {"start": store.start, "put_file": lambda: store.put_file("adapters/aa", source),
            "exists": lambda: store.exists("adapters/aa"), "open": lambda: store.open("adapters/aa"),
            "delete": lambda: store.delete("adapters/aa"), "list": lambda: list(store.list("adapters")),
            "read_object": lambda: store.read_object("models", "tiny/config.json", 1024),
            "incomplete_uploads": lambda: list(store.incomplete_uploads("adapters")),
            "abort_upload": lambda: store.abort_upload(IncompleteUpload("adapters/aa", "id", dt.datetime.now()))}


def test_s3_endpoint_refusing_connections_is_blob_store_unavailable(tmp_path):
    """Each call used to leak urllib3's MaxRetryError, which callers could not tell from a bug."""
    endpoint = f"127.0.0.1:{free_port()}"
    for name, call in every_call(s3_store(endpoint, retries=0), tmp_path).items():
        with pytest.raises(BlobStoreUnavailable) as caught:
            call()
        assert endpoint in str(caught.value) and "refused" in str(caught.value), name
        assert isinstance(caught.value, ConnectionError) and caught.value.endpoint == endpoint


def test_s3_endpoint_that_never_answers_is_blob_store_unavailable(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts (the kernel does), never answers
        endpoint = f"127.0.0.1:{silent.getsockname()[1]}"
        store = s3_store(endpoint, connect_timeout=0.5, read_timeout=0.5, retries=0)
        with pytest.raises(BlobStoreUnavailable, match="timed out"):
            store.exists("adapters/aa")


class _Unavailable(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        self.send_response(503)
        self.send_header("Retry-After", "3600")  # minio's default client would sleep an hour, per try
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", "4")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(b"busy")

    do_GET = do_HEAD = do_PUT = do_DELETE = do_POST = _answer

    def log_message(self, *args) -> None:
        return None


@pytest.mark.timeout(120)
def test_s3_endpoint_answering_503_is_blob_store_unavailable_without_honouring_retry_after(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        endpoint = f"127.0.0.1:{server.server_address[1]}"
        for name in ("exists", "open", "read_object"):
            with pytest.raises(BlobStoreUnavailable, match="503") as caught:
                every_call(s3_store(endpoint), tmp_path)[name]()
            assert endpoint in str(caught.value), name
    finally:
        server.shutdown()
        server.server_close()


def test_s3_client_limits_are_bounded():
    """minio's own client: 5 minutes to connect and per read, 5 retries (a down endpoint held an
    RPC for up to half an hour). Ours: the documented constants of blobstore/s3.py."""
    pool = s3_store("127.0.0.1:9").client._http.connection_pool_kw
    assert (pool["timeout"].connect_timeout, pool["timeout"].read_timeout) == (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)
    assert pool["retries"].total == RETRIES and not pool["retries"].respect_retry_after_header
    assert CONNECT_TIMEOUT_S <= 10 and READ_TIMEOUT_S <= 60 and RETRIES <= 3
