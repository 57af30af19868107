"""CancelJob against publication (decision in services/trainer/publish.py): once the Registry has
committed the job's adapter the cancel is refused and the job succeeds; before that the cancel
wins and nothing is published. A CANCELLED job never leaves a version behind, a SUCCEEDED one
always has its version and binding. Driven deterministically: the real JobQueue and JobRunner on a
SQLite store, a fake Registry whose calls wait on events the test sets. No sleeps, no timing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from services.common.errors import FailedPrecondition, Unavailable
from services.trainer.events import EventHub
from services.trainer.outage import OutageWait
from services.trainer.publish import PublicationCancelled, PublicationGate, Publisher
from services.trainer.queue import JobQueue
from services.trainer.records import CANCELLED, QUEUED, RUNNING, SUCCEEDED, JobRecord
from services.trainer.registry_client import PublishedAdapter
from services.trainer.runner import WEIGHTS, JobRunner, RunnerEnv
from services.trainer.store import TrainerStore
from tests.trainer.harness import STORE_START, store_with_dataset

JOB = "job_0"


class Registry:
    """Commits an upload as soon as it is received (`versions`), then holds its answer until
    `answer` is set: the window in which a cancel can land after the commit. Binds wait for
    `bind_answer`. With `down`, uploads fail as UNAVAILABLE without committing."""

    def __init__(self) -> None:
        self.versions: list[PublishedAdapter] = []
        self.bindings: list[tuple[str, int]] = []
        self.attempts, self.down = 0, False
        self.received, self.answer, self.bind_answer = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.refused = asyncio.Event()

    async def upload_adapter(self, tenant_id, name, base_model, folder, description, labels) -> PublishedAdapter:
        self.attempts += 1
        if self.down:
            self.refused.set()
            raise Unavailable("the registry is down")
        self.versions.append(PublishedAdapter("adp_1", name, 1, created=True))
        self.received.set()
        await self.answer.wait()
        return self.versions[-1]

    async def bind_deployment(self, name, tenant_id, base_model, adapter_name, version) -> None:
        await self.bind_answer.wait()
        self.bindings.append((name, version))


@pytest.fixture
def store(tmp_path) -> Iterator[TrainerStore]:
    db, store = store_with_dataset(tmp_path / "trainer.db")
    store.insert_job(JobRecord(JOB, "tnt_a", QUEUED, "tiny", "ds_1", {"r": 4}, {"seed": 0}, "fin", "fin-chat", 10,
                               STORE_START))
    yield store
    db.close()


async def run(fn, *args, **kwargs):
    return await asyncio.to_thread(fn, *args, **kwargs)


def trained_queue(store: TrainerStore, registry: Registry, jobs_dir) -> JobQueue:
    """A queue whose job has finished training (its output is complete): it goes straight to
    publication, as after a restart."""
    output = jobs_dir / JOB / "output"
    output.mkdir(parents=True)
    (output / WEIGHTS).write_bytes(b"weights")
    outage = OutageWait(600, first_backoff_s=3600)  # a retry never comes during a test: the wait is the state
    env = RunnerEnv(jobs_dir=jobs_dir, store=store, datasets=None, models=None, publisher=Publisher(registry, outage),
                    outage=outage, run=run, dtype="float32", torch_threads=1, keep_checkpoints=1)
    return JobQueue(store, EventHub(), lambda job, device, on_event: JobRunner(job, device, env, on_event), ["cpu"],
                    run, cancel_grace_s=1, max_interruptions=3, clear_folder=lambda job_id: None)


async def waiting(task: asyncio.Task) -> None:
    """Lets `task` run as far as it can without the Registry, and checks it is still waiting."""
    for _ in range(10):
        await asyncio.sleep(0)
    assert not task.done()


async def ended(queue: JobQueue, store: TrainerStore) -> JobRecord:
    await queue._runners[JOB].finalized.wait()  # set once the outcome is recorded
    return await run(store.get_job, JOB)


def test_a_cancel_landing_after_the_registry_committed_the_adapter_is_refused_and_the_job_succeeds(store, tmp_path):
    async def main():
        registry = Registry()
        queue = trained_queue(store, registry, tmp_path / "jobs")
        await queue.start()
        await registry.received.wait()  # the Registry has committed v1; its answer is on the way
        cancel = asyncio.create_task(queue.cancel(JOB))
        await waiting(cancel)  # for the Registry's answer
        registry.answer.set()
        with pytest.raises(FailedPrecondition) as refused:  # was: the job CANCELLED with v1 in the Registry
            await cancel
        assert refused.value.reason == "JOB_PUBLISHED" and "already published as 'fin' v1" in refused.value.message
        assert (queue.live(JOB).adapter_id, queue.live(JOB).state) == ("adp_1", RUNNING)  # shown while it binds
        registry.bind_answer.set()
        done = await ended(queue, store)
        assert (done.state, done.adapter_id, done.adapter_version) == (SUCCEEDED, "adp_1", 1)
        assert registry.bindings == [("fin-chat", 1)]
        await queue.close(1)

    asyncio.run(main())


def test_a_cancel_while_publication_waits_out_an_outage_wins_and_nothing_is_published(store, tmp_path):
    async def main():
        registry = Registry()
        registry.down = True
        queue = trained_queue(store, registry, tmp_path / "jobs")
        await queue.start()
        await registry.refused.wait()
        assert "uploading the adapter to the registry failed" in queue.live(JOB).waiting_for
        cancelled = await queue.cancel(JOB)
        assert cancelled.state == CANCELLED and cancelled.error == "cancelled by request during publication"
        registry.down = False
        await queue.close(1)
        assert (registry.attempts, registry.versions, registry.bindings) == (1, [], [])

    asyncio.run(main())


def test_a_job_the_shutdown_requeued_after_its_commit_cannot_be_cancelled_while_queued(store, tmp_path):
    async def main():
        registry = Registry()
        queue = trained_queue(store, registry, tmp_path / "jobs")
        await queue.start()
        await registry.received.wait()
        closing = asyncio.create_task(queue.close(30))  # lets the upload in flight answer, then stops the bind
        await waiting(closing)
        registry.answer.set()
        await closing
        requeued = await run(store.get_job, JOB)
        assert (requeued.state, requeued.adapter_id, requeued.adapter_version) == (QUEUED, "adp_1", 1)
        with pytest.raises(FailedPrecondition) as refused:  # was: CANCELLED, with v1 in the Registry
            await queue.cancel(JOB)
        assert refused.value.reason == "JOB_PUBLISHED"
        assert (await run(store.get_job, JOB)).state == QUEUED

    asyncio.run(main())


def test_no_upload_starts_once_a_cancel_closed_the_gate():
    async def main():
        async def record(adapter) -> None:
            pass

        async def upload() -> PublishedAdapter:
            raise AssertionError("uploaded after the cancel was accepted")

        gate = PublicationGate(None, record)
        assert await gate.close() is None  # the cancel wins
        with pytest.raises(PublicationCancelled):
            await gate.commit(upload)
        published = PublishedAdapter("adp_1", "fin", 1, created=False)
        assert await PublicationGate(published, record).close() == published  # committed by an earlier run

    asyncio.run(main())

