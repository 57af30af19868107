"""The job queue: tenants take turns, FIFO within each; one running job per device slot.

- Dispatch: whenever a job is queued or a slot frees up, the next queued job is claimed
  (queued -> running in one SQL transaction) and handed to a JobRunner on the free device:
  the oldest of the tenant whose turn it is (store.py, _next_tenant), so one tenant's long
  queue cannot keep every other tenant's jobs waiting.
- Live state: a running job's figures live in its runner's record; events go to watchers at
  once and to SQL at most every PERSIST_INTERVAL_S (always at start, eval, checkpoint and end).
- Cancel: a queued job is cancelled by a conditional update (and its folder cleaned: it may
  have run before a restart); a running one by its runner (worker told to exit, killed after
  the grace period). CancelJob returns once the job is recorded as cancelled and its device
  is free. A running job may end otherwise all the same (it had finished publishing, or
  failed, when the cancel came): the cancel then answers FAILED_PRECONDITION as it would
  have a moment later, never a succeeded or failed job. Once the Registry has committed the
  job's adapter (publish.py) the cancel is refused at once, FAILED_PRECONDITION with reason
  JOB_PUBLISHED, and the job runs on to succeed; that holds for a job a shutdown put back in
  the queue after its commit too (its row records the version).
- Shutdown: running workers are asked to checkpoint and exit; their jobs go back to queued.
- Restart (decision): a job found `running` at start-up was interrupted by a crash or a kill.
  It goes back to the queue and *resumes from its last checkpoint* (the worker restores
  weights, optimizer, schedule and RNG; data order is a function of the step), or goes straight
  to publication when its output was complete. After --max-interruptions such restarts it is
  marked failed with the reason, so a job that crashes the trainer cannot do so forever.
One trainer process owns a database: two trainers on one database would both recover and
dispatch its jobs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from services.common.errors import FailedPrecondition, NotFound
from services.trainer.db.models import utcnow
from services.trainer.events import EventHub
from services.trainer.records import CANCELLED, FAILED, QUEUED, RUNNING, STATE_CHANGED, TERMINAL, JobRecord
from services.trainer.runner import JobRunner, Outcome
from services.trainer.store import TrainerStore

log = logging.getLogger("loraplex.trainer.queue")
PERSIST_INTERVAL_S = 2.0
_PROGRESS_FIELDS = ("step", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds")


def _log_failure(future: asyncio.Future) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("saving job progress failed", exc_info=future.exception())


def _finished(job_id: str, state: str) -> FailedPrecondition:
    return FailedPrecondition(f"job '{job_id}' is already {state}; only queued or running jobs can be cancelled",
                              reason="JOB_FINISHED", field="id")


def _published(job_id: str, adapter_name: str, version: int) -> FailedPrecondition:
    return FailedPrecondition(f"job '{job_id}' is already published as '{adapter_name}' v{version} and can no "
                              "longer be cancelled; to withdraw it, unbind its deployment and delete that version "
                              "in the registry", reason="JOB_PUBLISHED", field="id")


MakeRunner = Callable[[JobRecord, str, JobRunner.OnEvent], JobRunner]
#: Clears the folder of a job that ended without a runner (runner.py, clear_job_folder).
ClearFolder = Callable[[str], None]


class JobQueue:
    def __init__(self, store: TrainerStore, hub: EventHub, make_runner: MakeRunner, devices: list[str],
                 run: Callable[..., Awaitable], cancel_grace_s: float, max_interruptions: int,
                 clear_folder: ClearFolder) -> None:
        self.store, self.hub, self.make_runner, self.run = store, hub, make_runner, run
        self.clear_folder = clear_folder
        self.cancel_grace_s, self.max_interruptions = cancel_grace_s, max_interruptions
        self._free = list(devices)
        self._runners: dict[str, JobRunner] = {}
        self._tasks: set[asyncio.Task] = set()
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._closing = False
        self._dispatcher: asyncio.Task | None = None
        self._last_persist: dict[str, float] = {}
        # One thread: progress writes land in the order they were made.
        self._progress_writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="trainer-progress")

    async def start(self) -> None:
        await self.run(self.recover)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="trainer-dispatch")
        self.notify()

    def recover(self) -> None:
        """Requeues (or fails) jobs a previous trainer process left running (blocking)."""
        for job in self.store.jobs_in_state(RUNNING):
            count = job.interruptions + 1
            # The ETA its worker last reported is void either way: GetJob must not show one for
            # a job that is waiting in the queue or has failed.
            if count > self.max_interruptions:
                self.store.transition(job.id, [RUNNING], state=FAILED, interruptions=count, finished_at=utcnow(),
                                      eta_seconds=None,
                                      error=f"the trainer stopped unexpectedly {count} times while this job ran "
                                            f"(last progress: step {job.step} of {job.total_steps}); giving up")
                log.warning("job %s failed after %d interruptions", job.id, count)
                # As after any other end: its checkpoints and dataset copy go, its worker log stays.
                self.clear_folder(job.id)
            else:
                self.store.transition(job.id, [RUNNING], state=QUEUED, interruptions=count, eta_seconds=None)
                log.info("job %s was interrupted at step %d; requeued to resume from its last checkpoint",
                         job.id, job.step)

    def notify(self) -> None:
        self._wake.set()

    def live(self, job_id: str) -> JobRecord | None:
        runner = self._runners.get(job_id)
        return runner.record.snapshot() if runner is not None else None

    async def _dispatch(self) -> None:
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            while self._free and not self._closing:
                async with self._lock:
                    job = await self.run(self.store.claim_next)
                    if job is None:
                        break
                    device = self._free.pop(0)
                    runner = self.make_runner(job, device, self._on_event)
                    self._runners[job.id] = runner
                log.info("job %s started on %s", job.id, device)
                self.hub.publish(STATE_CHANGED, job)
                task = asyncio.create_task(self._drive(runner, device), name=f"job-{job.id}")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _drive(self, runner: JobRunner, device: str) -> None:
        try:
            outcome = await runner.run()
        except Exception as exc:  # noqa: BLE001 - a bug must fail the job, not the queue
            log.exception("job %s: unexpected error", runner.record.id)
            outcome = Outcome(FAILED, f"internal error in the trainer: {type(exc).__name__}: {exc}")
        try:
            await self._record(runner, outcome)
        finally:
            self._free.append(device)
            runner.finalized.set()
            self.notify()

    async def _record(self, runner: JobRunner, outcome: Outcome) -> None:
        record = runner.record
        changes = {name: getattr(record, name) for name in _PROGRESS_FIELDS}
        # No outcome leaves the job running, so no ETA outlives the run (back to the queue included).
        changes.update(state=outcome.state, error=outcome.error, eta_seconds=None)
        if outcome.state in TERMINAL:
            changes.update(finished_at=utcnow(), adapter_id=outcome.adapter_id,
                           adapter_version=outcome.adapter_version)
        async with self._lock:
            updated = await self.run(self.store.transition, record.id, [RUNNING], **changes)
            self._runners.pop(record.id, None)
            self._last_persist.pop(record.id, None)
        log.info("job %s -> %s %s", record.id, outcome.state, outcome.error)
        if updated is not None:
            self.hub.publish(STATE_CHANGED, updated)
        if outcome.state in TERMINAL:
            await self.run(runner.cleanup)

    def _on_event(self, kind: str | None, record: JobRecord, persist: bool) -> None:
        if kind is not None:
            self.hub.publish(kind, record)
        now = time.monotonic()
        if persist or now - self._last_persist.get(record.id, 0.0) >= PERSIST_INTERVAL_S:
            self._last_persist[record.id] = now
            try:
                written = asyncio.get_running_loop().run_in_executor(self._progress_writer, self.store.save_progress,
                                                                     record.snapshot())
            except RuntimeError:  # shutting down: the final state is recorded by _record
                return
            written.add_done_callback(_log_failure)

    async def cancel(self, job_id: str, reason: str = "cancelled by request") -> JobRecord:
        async with self._lock:
            runner = self._runners.get(job_id)
            if runner is None:
                return await self._cancel_without_runner(job_id, reason)
        published = await runner.cancel(self.cancel_grace_s, reason)
        if published is not None:
            raise _published(job_id, published.name, published.version)
        await runner.finalized.wait()
        record = await self.run(self.store.get_job, job_id)
        if record is None:  # its tenant was purged while the worker stopped
            raise NotFound(f"job '{job_id}' not found (its tenant was deleted)", reason="JOB_NOT_FOUND", field="id")
        if record.state == QUEUED:  # a shutdown gave it back to the queue before the cancel took: cancel it there
            return await self.cancel(job_id, reason)
        if record.state != CANCELLED:
            # The run had already decided its outcome (published, or failed) when the cancel
            # came: the cancel lost, and says so exactly as if it had come a moment later.
            raise _finished(job_id, record.state)
        return record

    async def _cancel_without_runner(self, job_id: str, reason: str) -> JobRecord:
        """Cancels a queued job, or says why not. Called under the lock: nothing claims the job
        between the read and the update (only a tenant purge may delete its row meanwhile)."""
        current = await self.run(self.store.get_job, job_id)
        if current is None:
            raise NotFound(f"job '{job_id}' not found", reason="JOB_NOT_FOUND", field="id")
        if current.state != QUEUED:
            raise _finished(job_id, current.state)
        if current.adapter_id:  # a shutdown put it back after the Registry committed its adapter
            raise _published(job_id, current.output_adapter_name, current.adapter_version)
        updated = await self.run(self.store.transition, job_id, [QUEUED], state=CANCELLED, error=reason,
                                 finished_at=utcnow())
        if updated is None:
            raise NotFound(f"job '{job_id}' not found (its tenant was deleted)", reason="JOB_NOT_FOUND", field="id")
        self.hub.publish(STATE_CHANGED, updated)
        # A queued job may have run before (put back by a shutdown or a crash): its checkpoints
        # and its copy of the tenant's dataset must not outlive it.
        await self.run(self.clear_folder, job_id)
        return updated

    async def close(self, grace_s: float) -> None:
        """Stops dispatching; running jobs checkpoint and go back to queued."""
        self._closing = True
        self.notify()
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        await asyncio.gather(*(runner.stop(grace_s) for runner in list(self._runners.values())),
                             return_exceptions=True)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace_s + 5)
        self._progress_writer.shutdown(wait=True)
