"""One running job: its folder, its worker process, its events and its publication.

JOB_DIR = `<data-dir>/jobs/<job id>/` holds spec.json, dataset.jsonl (a sha256-checked copy
from the blob store), checkpoints/, output/ (the finished PEFT adapter) and worker.log. A job
whose output/ is complete skips training and goes straight to publication, which is how a
job interrupted after training (or during publication) finishes after a restart. When a job
ends, everything but worker.log is removed.

The runner decides the job's outcome and the queue (queue.py) records it:
- worker done and published -> succeeded (with the adapter id and version);
- cancel requested -> cancelled (the worker is told to stop and killed after
  --cancel-grace-seconds; a publication not yet committed is abandoned). Once the Registry
  has committed the adapter the cancel is refused and the job goes on to succeed (publish.py);
- trainer shutting down -> back to queued (the worker checkpoints first when it can; an
  upload in flight is let answer first, so a committed version is recorded on the job, whose
  next run then publishes it again, idempotently, and cannot be cancelled);
- anything else -> failed, with the reason.

The dataset store and the Registry being down is waited out for --outage-wait-seconds
(outage.py) before the job fails; a cancel or shutdown ends that wait at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.common.errors import LoraplexError, Unavailable
from services.registry.blobstore.base import BlobStoreUnavailable
from services.trainer.base_models import BaseModels
from services.trainer.datasets import DatasetService
from services.trainer.hyperparams import TrainingSettings, plan_schedule
from services.trainer.outage import OutageWait
from services.trainer.publish import PublicationCancelled, PublicationGate, PublishError, Publisher
from services.trainer.records import CANCELLED, EVAL, FAILED, PROGRESS, QUEUED, RUNNING, SUCCEEDED, JobRecord
from services.trainer.registry_client import PublishedAdapter
from services.trainer.store import TrainerStore
from services.trainer.worker.launcher import WorkerProcess
from services.trainer.worker.protocol import CANCEL, EXIT_DONE, EXIT_FAILED, STOP, WorkerSpec

log = logging.getLogger("loraplex.trainer.runner")
WEIGHTS = "adapter_model.safetensors"
KEEP_AFTER_END = ("worker.log",)
#: After the worker was killed, how long to wait for the run to wind down before giving up on it.
KILL_WAIT_S = 15.0


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: str
    error: str = ""
    adapter_id: str = ""
    adapter_version: int = 0


@dataclasses.dataclass(frozen=True)
class RunnerEnv:
    """What every runner shares (built once by the app)."""

    jobs_dir: Path
    store: TrainerStore
    datasets: DatasetService
    models: BaseModels
    publisher: Publisher
    outage: OutageWait
    run: Callable[..., Awaitable]
    dtype: str
    torch_threads: int
    keep_checkpoints: int


def device_environment(device: str) -> tuple[str, str | None]:
    """(torch device inside the worker, CUDA_VISIBLE_DEVICES or None)."""
    if device.startswith("cuda:"):
        return "cuda:0", device.split(":", 1)[1]
    return device, None


class JobRunner:
    #: Called with (event kind or None, live record, persist now?) for every change.
    OnEvent = Callable[[str | None, JobRecord, bool], None]

    def __init__(self, record: JobRecord, device: str, env: RunnerEnv, on_event: OnEvent) -> None:
        self.record, self.device, self.env, self.on_event = record, device, env, on_event
        self.job_dir = env.jobs_dir / record.id
        self.cancel_requested = self.stop_requested = False
        self.cancel_reason = "cancelled by request"
        self.finalized = asyncio.Event()  # set by the queue once the outcome is recorded
        self._done = asyncio.Event()
        self._interrupted = asyncio.Event()  # set with cancel_requested / stop_requested: ends outage waits
        self._process: WorkerProcess | None = None
        self._publishing: asyncio.Future | None = None
        self._gate = PublicationGate(_published_before(record), self._record_published)
        self._worker_error = ""

    async def run(self) -> Outcome:
        try:
            return await self._run()
        except (LoraplexError, BlobStoreUnavailable) as exc:
            if self.cancel_requested or self.stop_requested:  # asked while waiting out an outage
                return Outcome(CANCELLED, self.cancel_reason) if self.cancel_requested else Outcome(QUEUED)
            return Outcome(FAILED, self._failure_reason(exc))
        finally:
            self._done.set()

    async def _run(self) -> Outcome:
        output = self.job_dir / "output"
        if not (output / WEIGHTS).is_file():
            spec_path = await self._prepare()
            code = EXIT_DONE if self.cancel_requested or self.stop_requested else await self._train(spec_path)
            if self.cancel_requested:
                return Outcome(CANCELLED, self.cancel_reason)
            if self.stop_requested:
                return Outcome(QUEUED)
            if code != EXIT_DONE:
                return Outcome(FAILED, self._failure(code))
        if self.cancel_requested or self.stop_requested:
            return Outcome(CANCELLED, self.cancel_reason) if self.cancel_requested else Outcome(QUEUED)
        self._publishing = asyncio.ensure_future(self.env.publisher.publish(self.record, output, self._gate,
                                                                            self._waiting))
        try:
            adapter = await self._publishing
        except (asyncio.CancelledError, PublicationCancelled):
            if self.cancel_requested:
                return Outcome(CANCELLED, f"{self.cancel_reason} during publication")
            if self.stop_requested:
                return Outcome(QUEUED)
            raise
        except PublishError as exc:
            published = exc.adapter or self._gate.published  # the latter: committed by an earlier run
            return Outcome(FAILED, str(exc), published.id if published else "", published.version if published else 0)
        return Outcome(SUCCEEDED, adapter_id=adapter.id, adapter_version=adapter.version)

    async def _record_published(self, adapter: PublishedAdapter) -> None:
        """Stores the committed version on the job before it can be shown or cancelled: a run
        the shutdown interrupts then cannot be cancelled once queued again (queue.py)."""
        record = self.record
        record.adapter_id, record.adapter_version = adapter.id, adapter.version
        await self.env.run(self.env.store.transition, record.id, [RUNNING], adapter_id=adapter.id,
                           adapter_version=adapter.version)

    def _waiting(self, what: str) -> None:
        """Shows (or, with "", clears) what the job waits for to GetJob and WatchJob."""
        self.record.waiting_for = what
        self.on_event(PROGRESS, self.record, False)

    def _failure_reason(self, exc: LoraplexError | BlobStoreUnavailable) -> str:
        waited = f"down {self.env.outage.spent}"
        if isinstance(exc, BlobStoreUnavailable):  # reading the dataset: not the job's fault, nor a trainer bug
            return f"the dataset store stayed {waited} ({exc}); start the job again once it is back"
        if isinstance(exc, Unavailable):
            return f"the registry stayed {waited}: {exc.message}"
        return exc.message

    async def _prepare(self) -> Path:
        job, env = self.record, self.env
        await env.run(self.job_dir.mkdir, parents=True, exist_ok=True)
        dataset = await env.run(env.store.get_dataset, job.dataset_id)
        if dataset is None:
            raise LoraplexError(f"dataset '{job.dataset_id}' no longer exists")
        data_path = self.job_dir / "dataset.jsonl"
        await env.outage.retrying(f"job {job.id}: reading the dataset from its store",
                                  lambda: env.run(env.datasets.read_into, dataset, data_path),
                                  (BlobStoreUnavailable,), self._interrupted, self._waiting)
        base = await env.outage.retrying(f"job {job.id}: looking up the base model in the registry",
                                         lambda: env.models.get(job.base_model), (Unavailable,), self._interrupted,
                                         self._waiting)
        schedule = plan_schedule(TrainingSettings(**job.training), dataset.num_examples, dataset.longest_example)
        device, _ = device_environment(self.device)
        spec = WorkerSpec(job_id=job.id, base_model_name=base.name, base_model_path=base.location,
                          dataset_path=str(data_path), dataset_format=dataset.format, lora=job.lora,
                          training=job.training, num_eval=schedule.num_eval, total_steps=schedule.total_steps,
                          steps_per_epoch=schedule.steps_per_epoch, checkpoint_every=schedule.checkpoint_every,
                          checkpoint_dir=str(self.job_dir / "checkpoints"), output_dir=str(self.job_dir / "output"),
                          device=device, dtype=env.dtype, torch_threads=env.torch_threads,
                          keep_checkpoints=env.keep_checkpoints)
        spec_path = self.job_dir / "spec.json"
        await env.run(spec.write, spec_path)
        return spec_path

    async def _train(self, spec_path: Path) -> int:
        _, visible = device_environment(self.device)
        self._process = WorkerProcess(spec_path, self.job_dir / "worker.log", visible)
        await self._process.start()
        log.info("job %s training on %s (worker pid %s)", self.record.id, self.device, self._process.pid)
        if self.cancel_requested or self.stop_requested:  # asked while the process was starting
            self._process.send(CANCEL if self.cancel_requested else STOP)
        async for event in self._process.events():
            self._apply(event)
        return await self._process.wait()

    def _apply(self, event: dict) -> None:
        record, kind = self.record, event["event"]
        if kind in ("started", "progress"):
            for name in ("step", "epoch", "loss", "learning_rate", "tokens_per_second", "eta_seconds"):
                if name in event:
                    setattr(record, name, event[name])
            self.on_event(PROGRESS, record, kind == "started")
        elif kind == "eval":
            record.eval_loss = event["eval_loss"]
            self.on_event(EVAL, record, True)
        elif kind in ("checkpoint", "done"):
            # "done": publication may wait out a Registry outage for minutes, and a crash then
            # must not lose the finished run's figures (they are what the job shows once published).
            self.on_event(None, record, True)
        elif kind == "error":
            self._worker_error = str(event.get("message", ""))

    def _failure(self, code: int) -> str:
        if code == EXIT_FAILED and self._worker_error:
            return f"training failed: {self._worker_error}"
        if code < 0:
            name = signal.Signals(-code).name
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"the training worker was killed by {name}{hint}"
        return f"the training worker exited with status {code}; see worker.log of job {self.record.id}"

    async def _end(self, command: str, grace: float) -> None:
        self._interrupted.set()
        if self._publishing is not None:
            # An upload is let answer (within the grace): abandoned, the Registry might commit it
            # unbeknown to the job. A cancel got here through the gate, so none is in flight then.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._gate.answered(), grace)
            self._publishing.cancel()
        if self._process is not None:
            self._process.send(command)
        try:
            await asyncio.wait_for(asyncio.shield(self._done.wait()), grace)
            return
        except TimeoutError:
            pass
        if self._process is not None and self._process.exitcode is None:
            log.warning("job %s: worker did not exit within %.1fs; killing it", self.record.id, grace)
            self._process.kill()
        try:
            await asyncio.wait_for(asyncio.shield(self._done.wait()), KILL_WAIT_S)
        except TimeoutError:
            log.error("job %s: run did not end after its worker was killed", self.record.id)

    async def cancel(self, grace: float, reason: str = "cancelled by request") -> PublishedAdapter | None:
        """Stops training now (no checkpoint); the outcome will be cancelled, with `reason`.

        Returns at once with the adapter version instead, when the Registry has already committed
        it: the cancel is refused and the job runs on to its end (publish.py)."""
        published = await self._gate.close()
        if published is not None:
            return published
        self.cancel_requested, self.cancel_reason = True, reason  # no await since the gate closed
        await self._end(CANCEL, grace)
        return None

    async def stop(self, grace: float) -> None:
        """For shutdown: checkpoint at the next step boundary and exit; the job goes back to queued."""
        self.stop_requested = True
        await self._end(STOP, grace)

    def cleanup(self) -> None:
        """Removes the job folder's contents except the worker log (blocking)."""
        clear_job_folder(self.job_dir)


def _published_before(record: JobRecord) -> PublishedAdapter | None:
    """The version an earlier run of this job committed (it was interrupted after the commit)."""
    if not record.adapter_id:
        return None
    return PublishedAdapter(record.adapter_id, record.output_adapter_name, record.adapter_version, created=False)


def clear_job_folder(job_dir: Path) -> None:
    """What a job leaves once it has ended: its worker log only (blocking)."""
    if not job_dir.is_dir():
        return
    for entry in job_dir.iterdir():
        if entry.name not in KEEP_AFTER_END:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
