"""Domain records <-> protobuf messages. No logic beyond field mapping lives here.

Hyperparameters that are `float` on the wire arrive as float32: 1.1 epochs is 1.100000023841858,
which made a job of 10 steps per epoch train 12 steps instead of 11 (the schedule rounds up),
and a dropout of 0.1 reached adapter_config.json as 0.10000000149011612. They are read back as
the shortest decimal that is the same float32, i.e. what the caller wrote.
"""

from __future__ import annotations

import datetime as dt
import math
import struct

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.timestamps import timestamp
from services.trainer import records
from services.trainer.datasets import DatasetHeader
from services.trainer.hyperparams import LoraRequest, TrainingRequest
from services.trainer.jobs import JobRequest

_FORMATS = {pb.DATASET_FORMAT_UNSPECIFIED: "auto", pb.DATASET_FORMAT_AUTO: "auto", pb.DATASET_FORMAT_CHAT: "chat",
            pb.DATASET_FORMAT_PROMPT_COMPLETION: "prompt_completion"}
_FORMAT_ENUMS = {"chat": pb.DATASET_FORMAT_CHAT, "prompt_completion": pb.DATASET_FORMAT_PROMPT_COMPLETION}
_SCHEDULES = {pb.LR_SCHEDULE_UNSPECIFIED: "", pb.LR_SCHEDULE_CONSTANT: "constant", pb.LR_SCHEDULE_LINEAR: "linear",
              pb.LR_SCHEDULE_COSINE: "cosine"}
_SCHEDULE_ENUMS = {name: value for value, name in _SCHEDULES.items() if name}
_STATES = {pb.JOB_STATE_QUEUED: records.QUEUED, pb.JOB_STATE_RUNNING: records.RUNNING,
           pb.JOB_STATE_SUCCEEDED: records.SUCCEEDED, pb.JOB_STATE_FAILED: records.FAILED,
           pb.JOB_STATE_CANCELLED: records.CANCELLED}
_STATE_ENUMS = {name: value for value, name in _STATES.items()}
_KINDS = {records.SNAPSHOT: pb.JOB_EVENT_KIND_SNAPSHOT, records.STATE_CHANGED: pb.JOB_EVENT_KIND_STATE_CHANGED,
          records.PROGRESS: pb.JOB_EVENT_KIND_PROGRESS, records.EVAL: pb.JOB_EVENT_KIND_EVAL}


_FLOAT32_MAX = struct.unpack("f", bytes.fromhex("ffff7f7f"))[0]


def _as_written(value: float) -> float:
    """The shortest decimal whose float32 is `value` (a float32 widened to a Python float)."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        candidate = float(f"{value:.{digits}g}")
        # A decimal above the largest float32 (3.4028235e38) would pass no float32 range check.
        if abs(candidate) <= _FLOAT32_MAX and struct.unpack("f", struct.pack("f", candidate))[0] == value:
            return candidate
    return value


def dataset_header(header: pb.UploadDatasetHeader) -> DatasetHeader:
    if header.format not in _FORMATS:
        raise InvalidArgument(f"header.format {header.format} is not a DatasetFormat", field="header.format")
    return DatasetHeader(tenant=header.tenant, name=header.name, format=_FORMATS[header.format],
                         base_model=header.base_model, max_seq_len=header.max_seq_len, request_id=header.request_id)


def dataset(record: records.DatasetRecord) -> pb.Dataset:
    return pb.Dataset(id=record.id, tenant_id=record.tenant_id, name=record.name, format=_FORMAT_ENUMS[record.format],
                      num_examples=record.num_examples, size_bytes=record.size_bytes, sha256=record.sha256,
                      created_at=timestamp(record.created_at))


def job_request(request: pb.StartJobRequest) -> JobRequest:
    lora, training = request.lora, request.training
    if training.lr_schedule not in _SCHEDULES:
        raise InvalidArgument(f"training.lr_schedule {training.lr_schedule} is not an LrSchedule",
                              field="training.lr_schedule")
    return JobRequest(
        tenant=request.tenant, base_model=request.base_model, dataset_id=request.dataset_id,
        lora=LoraRequest(r=lora.r, alpha=_as_written(lora.alpha) if lora.HasField("alpha") else None,
                         dropout=_as_written(lora.dropout),
                         target_modules=tuple(lora.target_modules), use_rslora=lora.use_rslora),
        training=TrainingRequest(
            epochs=_as_written(training.epochs) if training.HasField("epochs") else None,
            max_steps=training.max_steps if training.HasField("max_steps") else None,
            learning_rate=_as_written(training.learning_rate) if training.HasField("learning_rate") else None,
            lr_schedule=_SCHEDULES[training.lr_schedule], warmup_steps=training.warmup_steps,
            batch_size=training.batch_size, gradient_accumulation_steps=training.gradient_accumulation_steps,
            max_seq_len=training.max_seq_len, seed=training.seed, eval_fraction=_as_written(training.eval_fraction),
            checkpoint_every_steps=training.checkpoint_every_steps),
        output_adapter_name=request.output_adapter_name, deployment_name=request.deployment_name,
        request_id=request.request_id)


def states(values) -> list[str]:
    unknown = [value for value in values if value not in _STATES]
    if unknown:
        raise InvalidArgument(f"states has values that are not job states: {unknown}", field="states")
    return [_STATES[value] for value in values]


def job(record: records.JobRecord) -> pb.Job:
    lora, training = record.lora, record.training
    return pb.Job(
        id=record.id, tenant_id=record.tenant_id, state=_STATE_ENUMS[record.state], base_model=record.base_model,
        dataset_id=record.dataset_id,
        lora=pb.LoraConfig(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                           target_modules=lora["target_modules"], use_rslora=lora["use_rslora"]),
        training=pb.TrainingConfig(
            epochs=training["epochs"], max_steps=training["max_steps"], learning_rate=training["learning_rate"],
            lr_schedule=_SCHEDULE_ENUMS[training["lr_schedule"]], warmup_steps=training["warmup_steps"],
            batch_size=training["batch_size"], gradient_accumulation_steps=training["gradient_accumulation_steps"],
            max_seq_len=training["max_seq_len"], seed=training["seed"], eval_fraction=training["eval_fraction"],
            checkpoint_every_steps=training["checkpoint_every_steps"]),
        output_adapter_name=record.output_adapter_name, deployment_name=record.deployment_name,
        progress=pb.JobProgress(step=record.step, total_steps=record.total_steps, epoch=record.epoch,
                                loss=record.loss, eval_loss=record.eval_loss, learning_rate=record.learning_rate,
                                tokens_per_second=record.tokens_per_second, eta_seconds=record.eta_seconds),
        adapter_id=record.adapter_id, adapter_version=record.adapter_version, error=record.error,
        created_at=timestamp(record.created_at), started_at=timestamp(record.started_at),
        finished_at=timestamp(record.finished_at), request_id=record.request_id or "",
        waiting_for=record.waiting_for)


def job_event(kind: str, record: records.JobRecord, at: dt.datetime) -> pb.JobEvent:
    return pb.JobEvent(kind=_KINDS[kind], job=job(record), time=timestamp(at))
