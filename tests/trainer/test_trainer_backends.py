"""The trainer on its production backends: PostgreSQL for state and S3 (moto, through the real
minio client) for datasets, with a job run end to end and a restart's recovery rules."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator

import grpc
import pytest
from minio import Minio

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.rpc import error_info
from services.trainer.db import TrainerDatabase
from services.trainer.queue import JobQueue
from services.trainer.records import FAILED, QUEUED, RUNNING, DatasetRecord, JobRecord
from services.trainer.store import TrainerStore
from tests.registry.backends import MotoS3, PostgresCluster
from tests.registry.client import expect_error
from tests.trainer.conftest import ADMIN_TOKEN
from tests.trainer.harness import InProcessTrainer, finance_chat_lines, s3_settings, trainer_config


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def moto(tmp_path_factory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


def test_postgres_and_s3_run_a_job_end_to_end(postgres, moto, registry, tmp_path, tenant):
    config = trainer_config(tmp_path / "trainer", registry.address, ADMIN_TOKEN,
                            database_url=postgres.new_database("trainer"), **s3_settings(moto.endpoint))
    trainer = InProcessTrainer(config).start()
    try:
        client = trainer.client(tenant.key)
        dataset = client.upload(finance_chat_lines())
        objects = list(Minio(moto.endpoint, "test", "test", secure=False).list_objects(
            "trainer-datasets", prefix="datasets/", recursive=True))
        assert [o.object_name for o in objects] == [f"datasets/{tenant.id.replace('_', '-')}/"
                                                    f"{dataset.id.replace('_', '-')}.jsonl"]
        job = client.wait(client.start(dataset.id, max_steps=2).id)
        assert job.state == pb.JOB_STATE_SUCCEEDED, job.error
        assert [j.id for j in client.call("ListJobs", pb.ListJobsRequest()).jobs] == [job.id]
    finally:
        trainer.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path) -> Iterator[TrainerStore]:
    url = request.getfixturevalue("postgres").new_database("store") if request.param == "postgres" \
        else f"sqlite:///{tmp_path / 'trainer.db'}"
    db = TrainerDatabase(url)
    db.migrate()
    db.migrate()  # idempotent, as every start runs it
    yield TrainerStore(db)
    db.close()


def _records(n: int) -> tuple[DatasetRecord, list[JobRecord]]:
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    dataset = DatasetRecord("ds_1", "tnt_a", "d", "chat", "tiny", 512, 10, 3, 100, "0" * 64, "datasets/a/b.jsonl",
                            start)
    jobs = [JobRecord(f"job_{i}", "tnt_a", QUEUED, "tiny", "ds_1", {"r": 4}, {"seed": 0}, "out", "", 10,
                      start + dt.timedelta(seconds=i)) for i in range(n)]
    return dataset, jobs


def test_queue_order_conditional_transitions_and_recovery(store):
    dataset, jobs = _records(3)
    store.insert_dataset(dataset)
    for job in jobs:
        store.insert_job(job)
    assert store.claim_next().id == "job_0"  # oldest first
    assert store.transition("job_1", [QUEUED], state="cancelled").state == "cancelled"
    assert store.transition("job_1", [QUEUED], state=RUNNING) is None  # the cancel won: no resurrection
    assert store.claim_next().id == "job_2"
    assert store.claim_next() is None

    queue = JobQueue(store, None, None, ["cpu"], None, cancel_grace_s=1, max_interruptions=1,
                     clear_folder=lambda job_id: None)
    queue.recover()  # both running jobs were interrupted once: back to the queue
    assert [j.id for j in store.jobs_in_state(QUEUED)] == ["job_0", "job_2"]
    assert store.get_job("job_0").interruptions == 1
    store.claim_next()
    queue.recover()  # job_0 again: over the limit, failed with the reason
    failed = store.get_job("job_0")
    assert failed.state == FAILED and "stopped unexpectedly 2 times" in failed.error and failed.finished_at
    assert store.get_job("job_2").state == QUEUED


def test_listing_pages_newest_first_and_deleting_a_dataset_in_use(store):
    from services.common.errors import FailedPrecondition
    from services.registry import paging

    dataset, jobs = _records(5)
    store.insert_dataset(dataset)
    for job in jobs:
        store.insert_job(job)
    seen, token = [], ""
    while True:
        rows, token = store.list_jobs("tnt_a", [], paging.page_request("trainer_jobs", 2, token))
        seen += [row.id for row in rows]
        if not token:
            break
    assert seen == ["job_4", "job_3", "job_2", "job_1", "job_0"]
    assert store.list_jobs("tnt_other", [], paging.page_request("trainer_jobs"))[0] == []
    assert [r.id for r in store.list_jobs(None, ["queued"], paging.page_request("trainer_jobs", 1))[0]] == ["job_4"]
    with pytest.raises(FailedPrecondition):
        store.delete_dataset("ds_1", "tnt_a")
    for job in jobs:
        store.transition(job.id, [QUEUED], state="cancelled")
    assert store.delete_dataset("ds_1", "tnt_a").id == "ds_1"
    assert store.get_dataset("ds_1") is None


def test_a_deleted_tenant_is_tombstoned_its_rows_go_and_the_feed_cursor_persists(store):
    from services.common.errors import NotFound

    dataset, jobs = _records(3)
    store.insert_dataset(dataset)
    for job in jobs[:2]:
        store.insert_job(job)
    other = dataclasses.replace(dataset, id="ds_2", tenant_id="tnt_b", blob_key="datasets/b/c.jsonl")
    store.insert_dataset(other)
    assert store.tenant_ids() == {"tnt_a", "tnt_b"}
    store.transition("job_0", [QUEUED], state=RUNNING)
    assert store.active_job_ids("tnt_a") == ["job_0", "job_1"]

    store.mark_tenant_deleted("tnt_a")
    store.mark_tenant_deleted("tnt_a")  # idempotent: a purge may run again after a crash
    assert store.claim_next() is None  # its queued job is never started
    with pytest.raises(NotFound):  # an upload or StartJob authenticated before the deletion
        store.insert_job(jobs[2])
    with pytest.raises(NotFound):
        store.insert_dataset(dataclasses.replace(dataset, id="ds_3"))
    assert store.delete_tenant_rows("tnt_a") == (["datasets/a/b.jsonl"], ["job_0", "job_1"])
    assert store.get_dataset("ds_1") is None and store.get_job("job_0") is None
    assert store.tenant_ids() == {"tnt_b"} and store.get_dataset("ds_2") is not None

    assert store.feed_cursor() is None  # never synced
    store.save_feed_cursor(41)
    store.save_feed_cursor(42)
    assert store.feed_cursor() == 42
    store.save_feed_cursor(None)
    assert store.feed_cursor() is None


def test_trainer_migrations_build_exactly_the_models_schema(store):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from services.trainer.db.models import Base
    from services.trainer.db.session import VERSION_TABLE

    with store.db.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "version_table": VERSION_TABLE})
        assert compare_metadata(context, Base.metadata) == []


def test_a_request_id_is_unique_per_tenant_and_key_less_jobs_never_collide(store):
    dataset, jobs = _records(4)
    store.insert_dataset(dataset)
    store.insert_job(jobs[0])  # no key
    assert store.insert_job(jobs[1]).id == "job_1"  # no key either: both stored
    keyed = dataclasses.replace(jobs[2], request_id="k1", request_digest="d")
    assert store.insert_job(keyed).id == "job_2"
    retry = dataclasses.replace(jobs[3], request_id="k1", request_digest="d")
    assert store.insert_job(retry).id == "job_2"  # the earlier job, nothing stored
    assert store.get_job("job_3") is None
    assert store.job_for_request("tnt_a", "k1").id == "job_2"
    assert store.job_for_request("tnt_b", "k1") is None
    store.insert_dataset(dataclasses.replace(dataset, id="ds_2", tenant_id="tnt_b", blob_key="datasets/b/c.jsonl"))
    other_tenant = dataclasses.replace(jobs[3], tenant_id="tnt_b", dataset_id="ds_2", request_id="k1")
    assert store.insert_job(other_tenant).id == "job_3"


def test_a_nul_in_request_text_is_invalid_argument_on_postgres(postgres, registry, tmp_path, tenant):
    # PostgreSQL text cannot hold U+0000: without the check these were INTERNAL there.
    config = trainer_config(tmp_path / "trainer", registry.address, ADMIN_TOKEN,
                            database_url=postgres.new_database("trainer_nul"))
    trainer = InProcessTrainer(config).start()
    try:
        client = trainer.client(tenant.key)
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.upload, finance_chat_lines(), name="a\x00b")
        assert error_info(error).metadata["field"] == "header.name"
        error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, client.call, "GetDataset",
                             pb.GetDatasetRequest(id="\x00"))
        assert error_info(error).metadata["field"] == "id"
        assert client.call("ListDatasets", pb.ListDatasetsRequest()).datasets == []
    finally:
        trainer.stop()


def test_cancelling_a_running_job_whose_tenant_was_purged_meanwhile_is_not_found(store):
    import asyncio

    from services.common.errors import NotFound

    class StoppingRunner:  # a worker that stops while a tenant purge deletes the job's row
        def __init__(self) -> None:
            self.finalized = asyncio.Event()

        async def cancel(self, grace_s: float, reason: str) -> None:
            store.delete_tenant_rows("tnt_a")
            self.finalized.set()

    async def main():
        queue = JobQueue(store, None, None, ["cpu"], lambda fn, *args: asyncio.to_thread(fn, *args),
                         cancel_grace_s=1, max_interruptions=1, clear_folder=lambda job_id: None)
        queue._runners["job_0"] = StoppingRunner()
        with pytest.raises(NotFound):  # was None, INTERNAL for the caller
            await queue.cancel("job_0")

    dataset, jobs = _records(1)
    store.insert_dataset(dataset)
    store.insert_job(jobs[0])
    asyncio.run(main())
