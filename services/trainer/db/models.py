"""SQLAlchemy 2 models of the trainer's state.

Decisions recorded here:
- Tables are prefixed `trainer_` and Alembic's version table is `trainer_alembic_version`, so
  the trainer may share one PostgreSQL database with the Registry without collisions.
- Ids are prefixed random strings (`ds_…`, `job_…`), as in the Registry.
- `tenant_id` is the Registry's tenant id; the trainer keeps no tenant table (the Registry is
  the source of truth) and every query filters on it.
- A job stores its *effective* LoRA and training settings (defaults applied) as JSON, plus the
  schedule derived from the dataset (`total_steps`), so what a job will do never changes after
  StartJob answered.
- `jobs.dataset_id` has no foreign key: finished jobs keep naming a dataset that was deleted
  later; deleting a dataset that queued or running jobs use is refused in code (datasets.py).
- Progress columns hold the latest figures; they are written at most every few seconds while a
  job runs (the live figures are in memory, see queue.py) and always at state changes.
- Deleted tenants leave a tombstone (`trainer_deleted_tenants`): creating a dataset or job
  checks it in the same transaction, so an upload or StartJob that passed authentication just
  before the tenant was deleted cannot store anything after its data was purged (tenants.py).
- StartJob's and UploadDataset's idempotency key `request_id` is unique per tenant (NULL, never
  "", when absent: NULLs are distinct in a unique index on SQLite and PostgreSQL alike, so
  key-less rows never collide); `request_digest` hashes the request's settings (and an upload's
  bytes) to recognise a retry.
- `trainer_feed_state` holds one row: the Registry change-feed sequence the trainer has applied,
  so a restart replays the deletions it missed while it was down (feed.py).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, BigInteger, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from services.registry.db.models import UTCDateTime, utcnow

__all__ = ["Base", "DatasetRow", "DeletedTenantRow", "FeedStateRow", "JobRow", "utcnow"]


class Base(DeclarativeBase):
    pass


class DatasetRow(Base):
    __tablename__ = "trainer_datasets"
    __table_args__ = (Index("ix_trainer_datasets_tenant_created", "tenant_id", "created_at", "id"),
                      Index("ux_trainer_datasets_tenant_request", "tenant_id", "request_id", unique=True))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(255))
    # "chat" or "prompt_completion"
    format: Mapped[str] = mapped_column(String(32))
    # The base model whose tokenizer measured the examples, and the limit they were held to.
    base_model: Mapped[str] = mapped_column(String(128))
    max_seq_len: Mapped[int] = mapped_column(Integer)
    longest_example: Mapped[int] = mapped_column(Integer)
    num_examples: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    blob_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # UploadDataset's idempotency key, like the jobs' below (NULL when absent).
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_digest: Mapped[str] = mapped_column(String(64), default="")


class JobRow(Base):
    __tablename__ = "trainer_jobs"
    __table_args__ = (Index("ix_trainer_jobs_tenant_created", "tenant_id", "created_at", "id"),
                      Index("ix_trainer_jobs_state_created", "state", "created_at"),
                      Index("ix_trainer_jobs_dataset", "dataset_id"),
                      Index("ux_trainer_jobs_tenant_request", "tenant_id", "request_id", unique=True))

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(40))
    # queued, running, succeeded, failed, cancelled
    state: Mapped[str] = mapped_column(String(16))
    base_model: Mapped[str] = mapped_column(String(128))
    dataset_id: Mapped[str] = mapped_column(String(40))
    lora: Mapped[dict] = mapped_column(JSON)
    training: Mapped[dict] = mapped_column(JSON)
    output_adapter_name: Mapped[str] = mapped_column(String(63))
    deployment_name: Mapped[str] = mapped_column(String(128), default="")
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float] = mapped_column(Float, default=0.0)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    eval_loss: Mapped[float | None] = mapped_column(Float, nullable=True)
    learning_rate: Mapped[float] = mapped_column(Float, default=0.0)
    tokens_per_second: Mapped[float] = mapped_column(Float, default=0.0)
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    adapter_id: Mapped[str] = mapped_column(String(40), default="")
    adapter_version: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    # Times the trainer found this job running at start-up (it crashed or was killed meanwhile).
    interruptions: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    request_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    request_digest: Mapped[str] = mapped_column(String(64), default="")


class DeletedTenantRow(Base):
    __tablename__ = "trainer_deleted_tenants"

    tenant_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    deleted_at: Mapped[dt.datetime] = mapped_column(UTCDateTime(), default=utcnow)


class FeedStateRow(Base):
    __tablename__ = "trainer_feed_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1
    # The last Registry change sequence applied; NULL: never synced, or the Registry no longer
    # retains it (the next connection compares every local tenant with the Registry instead).
    cursor: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
