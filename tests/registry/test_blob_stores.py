"""Both blob stores through the one interface: atomic puts, reads, listing, deletion, and S3
multipart uploads and bucket creation against moto's S3 server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.registry.blobstore import LocalBlobStore, S3BlobStore
from services.registry.blobstore.base import check_key
from tests.registry.client import unique


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
