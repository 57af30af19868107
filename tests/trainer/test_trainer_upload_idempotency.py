"""UploadDataset's request_id: an upload retried after a lost answer returns the dataset the
first call stored instead of storing a copy (also when the retries race); the same key with
another header or other bytes is refused; keys are per tenant; malformed keys are refused."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import expect_error
from tests.trainer.harness import finance_chat_lines, prompt_completion_lines
from tests.trainer.test_trainer_datasets import stored_state


def _datasets(client) -> list[str]:
    return [d.id for d in client.call("ListDatasets", pb.ListDatasetsRequest()).datasets]


def test_a_retried_upload_returns_the_first_dataset_and_stores_nothing(new_tenant, trainer):
    client = new_tenant().trainer
    key = str(uuid.uuid4())
    first = client.upload(finance_chat_lines(), request_id=key)
    blobs = stored_state(trainer)[0]
    again = client.upload(finance_chat_lines(), request_id=key)
    assert again == first
    assert _datasets(client) == [first.id] and stored_state(trainer)[0] == blobs
    assert client.upload(finance_chat_lines()).id != first.id  # no key: a new dataset, as before

    # Once that dataset is deleted, the key names nothing: the upload stores it again.
    client.call("DeleteDataset", pb.DeleteDatasetRequest(id=first.id))
    assert client.upload(finance_chat_lines(), request_id=key).id != first.id


def test_concurrent_retries_store_one_dataset(new_tenant, trainer):
    client = new_tenant().trainer
    key = "upload-" + uuid.uuid4().hex
    with ThreadPoolExecutor(6) as pool:
        datasets = list(pool.map(lambda _: client.upload(finance_chat_lines(), request_id=key), range(6)))
    assert len({d.id for d in datasets}) == 1 and _datasets(client) == [datasets[0].id]
    ours = [blob for blob in stored_state(trainer)[0] if datasets[0].tenant_id.replace("_", "-") in blob]
    assert len(ours) == 1  # the copies the losing retries wrote were removed


@pytest.mark.parametrize("changes", [{"data": prompt_completion_lines()}, {"name": "other"},
                                     {"max_seq_len": 300}, {"fmt": pb.DATASET_FORMAT_CHAT}])
def test_the_same_key_with_another_header_or_other_bytes_is_refused(new_tenant, changes):
    client = new_tenant().trainer
    first = client.upload(finance_chat_lines(), request_id="ds-1")
    upload = {"data": finance_chat_lines(), "request_id": "ds-1", **changes}
    error = expect_error(grpc.StatusCode.ALREADY_EXISTS, client.upload, upload.pop("data"), **upload)
    assert first.id in error.details()
    assert (error_info(error).reason, error_info(error).metadata["field"]) == ("REQUEST_ID_REUSED",
                                                                               "header.request_id")
    assert _datasets(client) == [first.id]


def test_keys_belong_to_their_tenant_and_malformed_keys_are_refused(new_tenant):
    a, b = new_tenant().trainer, new_tenant().trainer
    assert a.upload(finance_chat_lines(), request_id="nightly").id != b.upload(finance_chat_lines(),
                                                                               request_id="nightly").id
    for bad in ("has space", "x" * 129, "naïve", "line\n"):
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, a.upload, finance_chat_lines(), request_id=bad)
        assert error_info(error).metadata["field"] == "header.request_id"
    assert len(_datasets(a)) == 1
