"""Registry DeleteTenant reaches the trainer (services/trainer/tenants.py, feed.py): the tenant's
jobs are cancelled (a running worker stops, like CancelJob), its datasets go (rows and blobs),
its job folders go, and nothing of it stays readable. Deletions made while the trainer was down
are caught up at restart, from the stored feed cursor or, when the Registry can no longer
resume from it, by checking every local tenant against the Registry."""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.trainer.db import TrainerDatabase
from services.trainer.store import TrainerStore
from tests.registry.client import bearer, expect_error
from tests.trainer.conftest import ADMIN_TOKEN
from tests.trainer.harness import (InProcessTrainer, TrainerClient, finance_chat_lines, pid_alive,
                                   prompt_completion_lines, trainer_config, wait_until, worker_pids)

LONG = 1_000_000  # optimizer steps: far more than the test will ever wait for
ALL = {"page_size": 1000}


def _not_found(admin: TrainerClient, rpc: str, request) -> bool:
    try:
        admin.call(rpc, request)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
        return True
    return False


def leftovers(admin: TrainerClient, data_dir: Path, tenant_id: str, dataset_ids: list[str],
              job_ids: list[str]) -> dict[str, list[str]]:
    """What the trainer still holds of a tenant: readable rows, blobs and job folders."""
    found = {
        "listed datasets": [d.id for d in admin.call("ListDatasets", pb.ListDatasetsRequest(page=ALL)).datasets
                            if d.tenant_id == tenant_id],
        "listed jobs": [j.id for j in admin.call("ListJobs", pb.ListJobsRequest(page=ALL)).jobs
                        if j.tenant_id == tenant_id],
        "readable datasets": [i for i in dataset_ids
                              if not _not_found(admin, "GetDataset", pb.GetDatasetRequest(id=i))],
        "readable jobs": [i for i in job_ids if not _not_found(admin, "GetJob", pb.GetJobRequest(id=i))],
        "blobs": sorted(str(p) for p in (data_dir / "blobs" / "datasets" / tenant_id.replace("_", "-")).rglob("*")
                        if p.is_file()),
        "job folders": [i for i in job_ids if (data_dir / "jobs" / i).exists()],
    }
    return {what: items for what, items in found.items() if items}


def wait_until_purged(admin: TrainerClient, data_dir: Path, tenant_id: str, dataset_ids: list[str],
                      job_ids: list[str]) -> None:
    with contextlib.suppress(AssertionError):
        wait_until(lambda: not leftovers(admin, data_dir, tenant_id, dataset_ids, job_ids), timeout=120)
    assert leftovers(admin, data_dir, tenant_id, dataset_ids, job_ids) == {}


def delete_tenant(registry_admin, tenant_id: str) -> None:
    registry_admin.DeleteTenant(rpb.DeleteTenantRequest(tenant=tenant_id, force=True))


def test_deleting_a_tenant_cancels_its_jobs_and_removes_everything_it_had(new_tenant, trainer, admin,
                                                                           registry_admin):
    doomed, kept = new_tenant("doomed"), new_tenant("kept")
    data_dir = trainer.config.data_dir
    chat = doomed.trainer.upload(finance_chat_lines())
    completion = doomed.trainer.upload(prompt_completion_lines(), name="pc")
    running = doomed.trainer.start(chat.id, name="long", max_steps=LONG)
    queued = doomed.trainer.start(completion.id, name="queued", max_steps=2)
    survivor = kept.trainer.upload(finance_chat_lines())
    doomed.trainer.wait_for(running.id, lambda job: job.state == pb.JOB_STATE_RUNNING and job.progress.step >= 1)
    pids = worker_pids(data_dir, running.id)
    assert pids

    watch = admin.stub.WatchJob(pb.WatchJobRequest(id=running.id), metadata=bearer(ADMIN_TOKEN), timeout=240)
    assert next(watch).kind == pb.JOB_EVENT_KIND_SNAPSHOT  # subscribed before the deletion
    with ThreadPoolExecutor(1) as pool:
        rest = pool.submit(list, watch)
        delete_tenant(registry_admin, doomed.id)
        events = rest.result(timeout=240)

    # The running job was cancelled (not trained to the end, not failed by the Registry's refusal).
    final = events[-1]
    assert final.kind == pb.JOB_EVENT_KIND_STATE_CHANGED and final.job.state == pb.JOB_STATE_CANCELLED
    assert "tenant was deleted" in final.job.error
    assert 1 <= final.job.progress.step < LONG
    wait_until_purged(admin, data_dir, doomed.id, [chat.id, completion.id], [running.id, queued.id])
    assert not any(pid_alive(pid) for pid in pids)  # its worker is gone: the device is free

    # Nothing can be created for the deleted tenant; other tenants keep their data.
    expect_error(grpc.StatusCode.NOT_FOUND, admin.upload, finance_chat_lines(), tenant=doomed.id)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, doomed.trainer.call, "ListDatasets", pb.ListDatasetsRequest())
    assert kept.trainer.call("GetDataset", pb.GetDatasetRequest(id=survivor.id)).id == survivor.id
    follow_up = kept.trainer.start(survivor.id, name="after", max_steps=2)
    assert kept.trainer.wait(follow_up.id).state == pb.JOB_STATE_SUCCEEDED  # the device slot was released


@pytest.mark.parametrize("cursor", ["kept", "unusable"])
def test_deletions_made_while_the_trainer_was_down_are_purged_when_it_restarts(new_tenant, registry,
                                                                               registry_admin, tmp_path, cursor):
    config = trainer_config(tmp_path / "trainer", registry.address, ADMIN_TOKEN)
    doomed, kept = new_tenant("down"), new_tenant("stays")
    first = InProcessTrainer(config).start()
    db = TrainerDatabase(config.effective_database_url)
    store = TrainerStore(db)
    try:
        dataset = first.client(doomed.key).upload(finance_chat_lines())
        job = first.client(doomed.key).start(dataset.id, name="long", max_steps=LONG)
        survivor = first.client(kept.key).upload(finance_chat_lines())
        first.client(doomed.key).wait_for(job.id, lambda current: current.progress.step >= 1)
        wait_until(lambda: store.feed_cursor() is not None)  # the first trainer follows the feed
    finally:
        first.stop()  # the running job checkpoints and goes back to the queue

    delete_tenant(registry_admin, doomed.id)
    if cursor == "unusable":  # ahead of the Registry's feed: OUT_OF_RANGE, as a pruned one would be
        store.save_feed_cursor(10**12)

    second = InProcessTrainer(config).start()
    try:
        admin = second.client(ADMIN_TOKEN)
        wait_until_purged(admin, config.data_dir, doomed.id, [dataset.id], [job.id])
        assert second.client(kept.key).call("GetDataset", pb.GetDatasetRequest(id=survivor.id)).id == survivor.id
        # The stored cursor follows the Registry's feed again (set once the purge is done).
        wait_until(lambda: store.feed_cursor() is not None and store.feed_cursor() < 10**12)
    finally:
        second.stop()
        db.close()
