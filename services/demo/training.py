"""One Trainer job per customer, watched live: each job's WatchJob stream drives its bar."""

from __future__ import annotations

import dataclasses
import threading

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as tpb
from services.demo.clients import Channels
from services.demo.progress import ProgressBoard
from services.demo.setup import Dataset

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    base_model: str
    steps: int
    learning_rate: float
    rank: int
    watch_timeout: float


@dataclasses.dataclass(frozen=True)
class Trained:
    dataset: Dataset
    job: tpb.Job  # terminal

    @property
    def succeeded(self) -> bool:
        return self.job.state == tpb.JOB_STATE_SUCCEEDED


def _label(dataset: Dataset) -> str:
    customer = dataset.tenant.customer
    return f"customer {customer.letter} {customer.domain}"


def start_job(channels: Channels, dataset: Dataset, plan: TrainingPlan) -> tpb.Job:
    customer = dataset.tenant.customer
    return channels.trainer(dataset.tenant.api_key).StartJob(tpb.StartJobRequest(
        base_model=plan.base_model, dataset_id=dataset.dataset_id,
        lora=tpb.LoraConfig(r=plan.rank, alpha=2.0 * plan.rank, target_modules=list(TARGET_MODULES)),
        # Memorising a small dataset on a tiny model: many passes, a constant rate, no eval split.
        training=tpb.TrainingConfig(max_steps=plan.steps, learning_rate=plan.learning_rate, batch_size=4,
                                    lr_schedule=tpb.LR_SCHEDULE_CONSTANT, seed=7),
        output_adapter_name=customer.adapter_name, deployment_name=customer.deployment))


def watch_job(channels: Channels, dataset: Dataset, job_id: str, board: ProgressBoard, timeout: float) -> tpb.Job:
    label, job = _label(dataset), None
    for event in channels.trainer(dataset.tenant.api_key).WatchJob(tpb.WatchJobRequest(id=job_id), timeout=timeout):
        job = event.job
        progress = job.progress
        board.update(label, state=tpb.JobState.Name(job.state).removeprefix("JOB_STATE_"), step=progress.step,
                     total=progress.total_steps, loss=progress.loss if progress.HasField("loss") else None,
                     tokens_per_second=progress.tokens_per_second,
                     eta_seconds=progress.eta_seconds if progress.HasField("eta_seconds") else None)
    if job is None:
        raise RuntimeError(f"the Trainer's WatchJob for {job_id} ended without an event")
    return job


def train_all(channels: Channels, datasets: list[Dataset], plan: TrainingPlan) -> list[Trained]:
    """Starts every job first (the Trainer queues them), then watches all of them at once."""
    jobs = [start_job(channels, dataset, plan) for dataset in datasets]
    board = ProgressBoard([_label(dataset) for dataset in datasets])
    results: dict[str, tpb.Job] = {}
    errors: list[BaseException] = []

    def watch(dataset: Dataset, job: tpb.Job) -> None:
        try:
            results[job.id] = watch_job(channels, dataset, job.id, board, plan.watch_timeout)
        except BaseException as exc:  # reported by the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=watch, args=pair, daemon=True) for pair in zip(datasets, jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return [Trained(dataset, results[job.id]) for dataset, job in zip(datasets, jobs)]
