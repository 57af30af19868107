"""A fine-tuning job's events (GET /v1/fine_tuning/jobs/{id}/events), read off the job itself.

The Trainer keeps no event log: WatchJob streams changes as they happen and GetJob has the
job's times, latest progress and outcome. So the events are derived from the job on each
call: created, started, the latest training step (a "metrics" event, as OpenAI reports
steps), a wait on an outage, and how it ended, newest first as OpenAI lists them. Their ids
are stable (`ftevent-<job id>-<kind>`), so `after` pages through them; the step event's id
names its step, since a later call shows a later one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.router.openai_fine_tuning import TrainerJob


def _event(job: TrainerJob, kind: str, at: float, message: str, level: str = "info", data: dict | None = None,
           type_: str = "message") -> dict:
    return {"object": "fine_tuning.job.event", "id": f"ftevent-{job.id}-{kind}", "created_at": int(at),
            "level": level, "message": message, "data": data or {}, "type": type_}


def job_events(job: TrainerJob, now: float) -> list[dict]:
    """The job's events, newest first; `now` dates the step and wait events of a running job."""
    events = [_event(job, "created", job.created_at, f"Created fine-tuning job: {job.id}")]
    if job.started_at is not None:
        events.append(_event(job, "started", job.started_at, "Fine-tuning job started"))
    if job.step:
        when = job.finished_at if job.finished_at is not None else now
        loss = f", training loss={job.loss:.4f}" if job.loss is not None else ""
        data = {"step": job.step, "total_steps": job.total_steps, "train_loss": job.loss}
        events.append(_event(job, f"step-{job.step}", when, f"Step {job.step}/{job.total_steps}{loss}", data=data,
                             type_="metrics"))
    if job.waiting_for and job.finished_at is None:
        events.append(_event(job, "waiting", now, f"Waiting: {job.waiting_for}", level="warn"))
    if job.finished_at is not None:
        events += _ending(job)
    return events[::-1]


def _ending(job: TrainerJob) -> list[dict]:
    at = job.finished_at or 0.0
    if job.state == "succeeded":
        return [_event(job, "model", at, f"New fine-tuned model created: {job.deployment_name}")
                if job.deployment_name else _event(job, "model", at, "New adapter published"),
                _event(job, "succeeded", at, "The job has successfully completed")]
    if job.state == "cancelled":
        return [_event(job, "cancelled", at, "The job was cancelled" + (f": {job.error}" if job.error else ""))]
    return [_event(job, "failed", at, f"The job failed: {job.error or 'no reason recorded'}", level="error")]
