"""Job lifecycle races, driven deterministically: the real JobQueue, JobService and EventHub on a
SQLite store, with fake runners whose outcome the test decides, and a `run` that lets the test
act at the exact moment a store call has returned (the race window). No sleeps, no timing."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator

import pytest

from services.common.errors import FailedPrecondition
from services.registry import paging
from services.trainer.events import EventHub
from services.trainer.jobs import JobService
from services.trainer.queue import JobQueue
from services.trainer.records import (ADMIN, CANCELLED, FAILED, QUEUED, RUNNING, SNAPSHOT, STATE_CHANGED,
                                      SUCCEEDED, JobRecord)
from services.trainer.runner import Outcome
from services.trainer.store import TrainerStore
from tests.trainer.harness import STORE_START, store_with_dataset

GUARD_S = 30  # only so that a missing terminal event fails instead of hanging; never an ordering device


@pytest.fixture
def store(tmp_path) -> Iterator[TrainerStore]:
    db, store = store_with_dataset(tmp_path / "trainer.db")
    for i in range(2):
        store.insert_job(JobRecord(f"job_{i}", "tnt_a", QUEUED, "tiny", "ds_1", {"r": 4}, {"seed": 0}, "out", "", 10,
                                   STORE_START + dt.timedelta(seconds=i)))
    yield store
    db.close()


class Steps:
    """The queue's `run`: blocking calls on a thread; `after[name]` runs once, right after that call."""

    def __init__(self) -> None:
        self.after: dict = {}

    async def __call__(self, fn, *args, **kwargs):
        result = await asyncio.to_thread(fn, *args, **kwargs)
        hook = self.after.pop(getattr(fn, "__name__", ""), None)
        if hook is not None:
            await hook()
        return result


class FakeRunner:
    """A running job whose outcome the test decides (`finish`); cancel and stop behave as
    JobRunner's: they return once the run has ended, however it ended."""

    def __init__(self, record: JobRecord, device: str, on_event) -> None:
        self.record, self.finalized = record, asyncio.Event()
        self.cancel_asked = asyncio.Event()
        self._outcome = asyncio.get_running_loop().create_future()

    def finish(self, outcome: Outcome) -> None:
        self._outcome.set_result(outcome)

    async def run(self) -> Outcome:
        return await asyncio.shield(self._outcome)

    async def cancel(self, grace_s: float, reason: str) -> None:
        self.cancel_asked.set()
        await asyncio.shield(self._outcome)

    async def stop(self, grace_s: float) -> None:
        if not self._outcome.done():
            self.finish(Outcome(QUEUED))
        await asyncio.shield(self._outcome)

    def cleanup(self) -> None:
        pass


class Setup:
    def __init__(self, store: TrainerStore) -> None:
        self.steps, self.hub, self.made, self.cleared = Steps(), EventHub(), asyncio.Queue(), []
        self.queue = JobQueue(store, self.hub, self._make, ["cpu"], self.steps, cancel_grace_s=1, max_interruptions=1,
                              clear_folder=self.cleared.append)
        self.jobs = JobService(store, self.queue, self.hub, None, _AllTenants(), None, self.steps, 64)

    def _make(self, record: JobRecord, device: str, on_event) -> FakeRunner:
        runner = FakeRunner(record, device, on_event)
        self.made.put_nowait(runner)
        return runner

    async def running(self) -> FakeRunner:
        """Starts the dispatcher; the runner of the oldest queued job, once it runs."""
        await self.queue.start()
        return await self.made.get()


class _AllTenants:
    async def tenant_filter(self, principal, ref: str) -> None:
        return None


async def _rest(watch) -> list[tuple[str, JobRecord]]:
    async def drain():
        return [event async for event in watch]
    return await asyncio.wait_for(drain(), GUARD_S)


# --- CancelJob racing the job's end ---

@pytest.mark.parametrize("ending", [SUCCEEDED, FAILED])
def test_a_cancel_that_loses_to_the_job_finishing_is_failed_precondition(store, ending):
    async def main():
        setup = Setup(store)
        runner = await setup.running()
        cancel = asyncio.create_task(setup.queue.cancel("job_0"))
        await runner.cancel_asked.wait()
        runner.finish(Outcome(ending, "boom" if ending == FAILED else ""))  # decided before the cancel took
        with pytest.raises(FailedPrecondition) as raised:  # was: the SUCCEEDED / FAILED job, as if cancelled
            await cancel
        assert raised.value.reason == "JOB_FINISHED" and raised.value.metadata == {"field": "id"}
        assert ending in raised.value.message
        assert store.get_job("job_0").state == ending
        await setup.queue.close(1)

    asyncio.run(main())


def test_a_cancel_that_wins_returns_the_cancelled_job(store):
    async def main():
        setup = Setup(store)
        runner = await setup.running()
        cancel = asyncio.create_task(setup.queue.cancel("job_0"))
        await runner.cancel_asked.wait()
        runner.finish(Outcome(CANCELLED, "cancelled by request"))
        assert (await cancel).state == CANCELLED
        await setup.queue.close(1)

    asyncio.run(main())


def test_a_cancel_racing_shutdown_cancels_the_job_the_shutdown_requeued(store):
    async def main():
        setup = Setup(store)
        runner = await setup.running()
        runner.record.eta_seconds = 42.0
        cancel = asyncio.create_task(setup.queue.cancel("job_0"))
        await runner.cancel_asked.wait()
        await setup.queue.close(1)  # the run ends back in the queue before the cancel takes
        cancelled = await cancel  # was: the QUEUED job, returned as the cancel's result
        assert cancelled.state == CANCELLED and cancelled.error == "cancelled by request"
        assert cancelled.eta_seconds is None  # no ETA outlives the run

    asyncio.run(main())


# --- ListJobs with a state filter ---

def test_a_state_filtered_listing_lists_only_jobs_in_those_states(store):
    async def main():
        setup = Setup(store)
        page = paging.page_request("trainer_jobs", 2)
        started = asyncio.Event()

        async def start_after_the_read():  # job_0's row was read as queued; now it starts
            runner = await setup.running()
            runner.record.step = 3
            started.set()

        setup.steps.after["list_jobs"] = start_after_the_read
        listed, token = await setup.jobs.list(ADMIN, "", [QUEUED], page)
        assert started.is_set()
        assert [(job.id, job.state) for job in listed] == [("job_1", QUEUED), ("job_0", QUEUED)]  # was: running
        assert token == ""  # the page is its rows: nothing dropped, so the token is the store's

        listed, _ = await setup.jobs.list(ADMIN, "", [RUNNING], page)
        assert [(job.id, job.state, job.step) for job in listed] == [("job_0", RUNNING, 3)]  # live figures kept

        seen = []

        async def list_before_the_runner_goes():  # the succeeded row is written; its runner is still there
            seen.extend((await setup.jobs.list(ADMIN, "", [SUCCEEDED], page))[0])

        runner = setup.queue._runners["job_0"]
        setup.steps.after["transition"] = list_before_the_runner_goes
        runner.finish(Outcome(SUCCEEDED))
        await runner.finalized.wait()
        assert [(job.id, job.state) for job in seen] == [("job_0", SUCCEEDED)]  # was: running
        await setup.queue.close(1)

    asyncio.run(main())


# --- WatchJob ---

def test_watchers_attached_at_any_moment_of_the_end_get_the_terminal_event_and_end(store):
    async def main():
        setup = Setup(store)
        runner = await setup.running()
        early = [setup.jobs.watch(ADMIN, "job_0") for _ in range(20)]
        for watch in early:
            assert (await anext(watch))[1].state == RUNNING
        late = setup.jobs.watch(ADMIN, "job_0")
        snapshots = []

        async def attach_while_the_end_is_written():  # row succeeded, runner still live, event not yet out
            snapshots.append(await anext(late))

        setup.steps.after["transition"] = attach_while_the_end_is_written
        runner.finish(Outcome(SUCCEEDED))
        await runner.finalized.wait()
        assert [(kind, record.state) for kind, record in snapshots] == [(SNAPSHOT, RUNNING)]
        for watch in [*early, late]:
            assert [(kind, record.state) for kind, record in await _rest(watch)] == [(STATE_CHANGED, SUCCEEDED)]
        after = await _rest(setup.jobs.watch(ADMIN, "job_0"))
        assert [(kind, record.state) for kind, record in after] == [(SNAPSHOT, SUCCEEDED)]
        assert setup.hub._watchers == {}  # every stream unsubscribed
        await setup.queue.close(1)

    asyncio.run(main())


def test_a_job_cancelled_while_queued_emits_exactly_one_state_change(store):
    async def main():
        setup = Setup(store)  # no dispatcher: the jobs stay queued
        watch = setup.jobs.watch(ADMIN, "job_1")
        assert (await anext(watch))[1].state == QUEUED
        first, second = await asyncio.gather(setup.queue.cancel("job_1"), setup.queue.cancel("job_1"),
                                             return_exceptions=True)
        assert first.state == CANCELLED and isinstance(second, FailedPrecondition)
        assert [(kind, record.state) for kind, record in await _rest(watch)] == [(STATE_CHANGED, CANCELLED)]
        assert setup.cleared == ["job_1"]  # once: what it left, had it run before a restart, goes

    asyncio.run(main())


# --- interruptions ---

def test_an_interrupted_job_shows_no_stale_eta_and_fails_with_the_reason(store):
    running = store.claim_next()
    store.save_progress(JobRecord(**{**running.__dict__, "step": 3, "eta_seconds": 12.5}))
    cleaned = []
    queue = JobQueue(store, None, None, ["cpu"], None, cancel_grace_s=1, max_interruptions=1,
                     clear_folder=cleaned.append)
    queue.recover()
    requeued = store.get_job("job_0")
    assert (requeued.state, requeued.interruptions, requeued.error) == (QUEUED, 1, "")
    assert requeued.eta_seconds is None  # GetJob's progress.eta_seconds unset; was 12.5 s to go, while queued
    running = store.claim_next()
    store.save_progress(JobRecord(**{**running.__dict__, "step": 3, "eta_seconds": 12.5}))
    queue.recover()
    failed = store.get_job("job_0")
    assert failed.state == FAILED and failed.interruptions == 2 and failed.finished_at
    assert "stopped unexpectedly 2 times" in failed.error and "step 3 of 10" in failed.error
    assert failed.eta_seconds is None  # was: 12.5 s to go, for a failed job
    assert cleaned == ["job_0"]  # its checkpoints go as after any end (only when it failed, not when requeued)
