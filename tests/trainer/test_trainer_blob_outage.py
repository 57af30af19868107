"""The trainer with its S3 dataset store down: uploads are UNAVAILABLE with nothing stored,
deletions still delete (the bytes are swept once the store is back), and the sweep removes
only old blobs that no dataset names."""

from __future__ import annotations

import datetime as dt
import os

import grpc

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.rpc import error_info
from services.registry.blobstore.local import LocalBlobStore
from services.trainer.blobs import dataset_key
from services.trainer.db import TrainerDatabase
from services.trainer.orphans import sweep_orphan_datasets
from services.trainer.records import DatasetRecord
from services.trainer.store import TrainerStore
from tests.registry.backends import MotoS3
from tests.registry.client import expect_error
from tests.trainer.conftest import ADMIN_TOKEN
from tests.trainer.harness import InProcessTrainer, finance_chat_lines, s3_settings, trainer_config


def test_a_store_outage_makes_uploads_unavailable_and_deletions_still_delete(registry, tmp_path, tenant):
    moto = MotoS3(tmp_path / "moto.log").start()
    config = trainer_config(tmp_path / "trainer", registry.address, ADMIN_TOKEN, **s3_settings(moto.endpoint))
    trainer = InProcessTrainer(config).start()
    try:
        client = trainer.client(tenant.key)
        kept = client.upload(finance_chat_lines())
        moto.stop()
        error = expect_error(grpc.StatusCode.UNAVAILABLE, client.upload, finance_chat_lines())  # was INTERNAL
        assert error_info(error).reason == "BLOB_STORE_UNAVAILABLE" and "not stored" in error.details()
        assert [d.id for d in client.call("ListDatasets", pb.ListDatasetsRequest()).datasets] == [kept.id]
        client.call("DeleteDataset", pb.DeleteDatasetRequest(id=kept.id))  # was INTERNAL, the row already gone
        expect_error(grpc.StatusCode.NOT_FOUND, client.call, "GetDataset", pb.GetDatasetRequest(id=kept.id))
    finally:
        trainer.stop()
        moto.stop()


def test_the_sweep_removes_old_blobs_no_dataset_names(tmp_path):
    db = TrainerDatabase(f"sqlite:///{tmp_path / 'trainer.db'}")
    db.migrate()
    store, blobs = TrainerStore(db), LocalBlobStore(tmp_path / "blobs")
    blobs.start()
    keys = {name: dataset_key("tnt_a", f"ds_{name}") for name in ("named", "orphan", "young")}
    for name, key in keys.items():
        source = tmp_path / f"{name}.jsonl"  # one file each: the local store hard-links its source
        source.write_text("{}\n")
        blobs.put_file(key, source)
    store.insert_dataset(DatasetRecord("ds_named", "tnt_a", "d", "chat", "tiny", 512, 1, 1, 3, "0" * 64,
                                       keys["named"], dt.datetime.now(dt.timezone.utc)))
    two_hours_ago = dt.datetime.now().timestamp() - 7200
    for name in ("named", "orphan"):
        os.utime(tmp_path / "blobs" / keys[name], (two_hours_ago, two_hours_ago))
    assert sweep_orphan_datasets(store, blobs) == [keys["orphan"]]
    assert sorted(blob.key for blob in blobs.list("datasets")) == sorted([keys["named"], keys["young"]])
    db.close()
