"""StartJob's request_id: a retried call returns the job the first call queued instead of
queueing another (also when the retries race, and after the dataset is gone); the same key
with other settings is refused; keys are per tenant; malformed keys are INVALID_ARGUMENT."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import expect_error
from tests.trainer.harness import finance_chat_lines


def _jobs(client) -> list[pb.Job]:
    return list(client.call("ListJobs", pb.ListJobsRequest()).jobs)


def test_a_retried_start_returns_the_first_job_and_queues_nothing(new_tenant):
    client = new_tenant().trainer
    dataset = client.upload(finance_chat_lines())
    key = str(uuid.uuid4())
    first = client.start(dataset.id, request_id=key, max_steps=10_000)
    again = client.start(dataset.id, request_id=key, max_steps=10_000)
    assert again.id == first.id and again.request_id == key
    assert [job.id for job in _jobs(client)] == [first.id]
    assert client.call("GetJob", pb.GetJobRequest(id=first.id)).request_id == key

    # Once the job has ended and its dataset is deleted, a late retry still gets that job back.
    client.call("CancelJob", pb.CancelJobRequest(id=first.id))
    client.wait(first.id)
    client.call("DeleteDataset", pb.DeleteDatasetRequest(id=dataset.id))
    late = client.start(dataset.id, request_id=key, max_steps=10_000)
    assert late.id == first.id and late.state == pb.JOB_STATE_CANCELLED
    assert len(_jobs(client)) == 1


def test_concurrent_retries_queue_one_job(new_tenant):
    client = new_tenant().trainer
    dataset = client.upload(finance_chat_lines())
    key = "retry-" + uuid.uuid4().hex
    with ThreadPoolExecutor(8) as pool:
        jobs = list(pool.map(lambda _: client.start(dataset.id, request_id=key, max_steps=10_000), range(8)))
    assert len({job.id for job in jobs}) == 1
    assert [job.id for job in _jobs(client)] == [jobs[0].id]
    client.call("CancelJob", pb.CancelJobRequest(id=jobs[0].id))


def test_the_same_key_with_other_settings_is_refused(new_tenant):
    client = new_tenant().trainer
    dataset = client.upload(finance_chat_lines())
    first = client.start(dataset.id, request_id="job-1", max_steps=10_000)
    for changes in ({"learning_rate": 5e-3}, {"name": "other"}, {"lora": pb.LoraConfig(r=4)}):
        error = expect_error(grpc.StatusCode.ALREADY_EXISTS, client.start, dataset.id, request_id="job-1",
                             **{"max_steps": 10_000, **changes})
        assert first.id in error.details()
        assert error_info(error).reason == "REQUEST_ID_REUSED"
        assert error_info(error).metadata["field"] == "request_id"
    assert [job.id for job in _jobs(client)] == [first.id]
    client.call("CancelJob", pb.CancelJobRequest(id=first.id))


def test_keys_belong_to_their_tenant(new_tenant):
    a, b = new_tenant().trainer, new_tenant().trainer
    job_a = a.start(a.upload(finance_chat_lines()).id, request_id="nightly", max_steps=10_000)
    job_b = b.start(b.upload(finance_chat_lines()).id, request_id="nightly", max_steps=10_000)
    assert job_a.id != job_b.id and job_a.tenant_id != job_b.tenant_id
    for client, job in ((a, job_a), (b, job_b)):
        client.call("CancelJob", pb.CancelJobRequest(id=job.id))


def test_malformed_keys_are_refused_before_anything_is_queued(new_tenant):
    client = new_tenant().trainer
    dataset = client.upload(finance_chat_lines())
    for bad in ("has space", "x" * 129, "naïve", "tab\there"):
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.start, dataset.id, request_id=bad)
        assert error_info(error).metadata["field"] == "request_id"
    assert _jobs(client) == []
    assert client.start(dataset.id, request_id="x" * 128, max_steps=10_000).request_id == "x" * 128
    client.call("CancelJob", pb.CancelJobRequest(id=_jobs(client)[0].id))
