"""CancelJob: a running job stops within the grace period and frees its device; a queued
job never runs; a finished job cannot be cancelled; a dataset in use cannot be deleted."""

from __future__ import annotations

import grpc

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from tests.registry.client import expect_error
from tests.trainer.harness import finance_chat_lines, worker_pids

LONG = 1_000_000  # optimizer steps: far more than the test will ever wait for


def test_cancel_stops_a_running_job_frees_the_device_and_skips_queued_ones(tenant, trainer):
    client = tenant.trainer
    dataset = client.upload(finance_chat_lines())
    running = client.start(dataset.id, name="long", max_steps=LONG)
    queued = client.start(dataset.id, name="queued", max_steps=2)
    client.wait_for(running.id, lambda job: job.state == pb.JOB_STATE_RUNNING and job.progress.step >= 1)
    assert worker_pids(trainer.config.data_dir, running.id)
    assert client.call("GetJob", pb.GetJobRequest(id=queued.id)).state == pb.JOB_STATE_QUEUED

    error = expect_error(grpc.StatusCode.FAILED_PRECONDITION, client.call, "DeleteDataset",
                         pb.DeleteDatasetRequest(id=dataset.id))
    assert running.id in error.details()

    cancelled = client.call("CancelJob", pb.CancelJobRequest(id=queued.id))
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.started_at.seconds == 0

    cancelled = client.call("CancelJob", pb.CancelJobRequest(id=running.id))
    assert cancelled.state == pb.JOB_STATE_CANCELLED and "cancelled" in cancelled.error
    assert 1 <= cancelled.progress.step < LONG and cancelled.finished_at.seconds
    assert worker_pids(trainer.config.data_dir, running.id) == []  # the process is gone: memory and device are free
    events = client.watch(running.id)
    assert [e.kind for e in events] == [pb.JOB_EVENT_KIND_SNAPSHOT]
    assert events[0].job.state == pb.JOB_STATE_CANCELLED

    expect_error(grpc.StatusCode.FAILED_PRECONDITION, client.call, "CancelJob", pb.CancelJobRequest(id=running.id))
    follow_up = client.start(dataset.id, name="after", max_steps=2)
    assert client.wait(follow_up.id).state == pb.JOB_STATE_SUCCEEDED  # the device slot was released
    listed = client.call("ListJobs", pb.ListJobsRequest(states=[pb.JOB_STATE_CANCELLED]))
    assert {job.id for job in listed.jobs} == {running.id, queued.id}
    client.call("DeleteDataset", pb.DeleteDatasetRequest(id=dataset.id))  # nothing active uses it now


def test_a_watcher_sees_the_cancellation_and_its_stream_ends(tenant):
    client = tenant.trainer
    dataset = client.upload(finance_chat_lines())
    job = client.start(dataset.id, name="watched", max_steps=LONG)
    call = client.stub.WatchJob(pb.WatchJobRequest(id=job.id), metadata=[("authorization", f"Bearer {tenant.key}")],
                                timeout=240)
    seen = []
    for event in call:
        seen.append(event)
        if event.kind == pb.JOB_EVENT_KIND_PROGRESS and event.job.progress.step >= 1 and len(seen) < 1000:
            client.call("CancelJob", pb.CancelJobRequest(id=job.id))
            seen += list(call)  # the rest of the stream, which must end by itself
            break
    assert seen[0].kind == pb.JOB_EVENT_KIND_SNAPSHOT
    assert seen[-1].kind == pb.JOB_EVENT_KIND_STATE_CHANGED and seen[-1].job.state == pb.JOB_STATE_CANCELLED


def test_cancel_of_an_unknown_job_is_not_found(tenant):  # an empty id: test_trainer_jobs.py
    expect_error(grpc.StatusCode.NOT_FOUND, tenant.trainer.call, "CancelJob", pb.CancelJobRequest(id="job_unknown"))
