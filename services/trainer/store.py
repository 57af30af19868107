"""SQL reads and writes of datasets and jobs (synchronous; callers run them on a thread pool).

State changes are conditional updates (`WHERE state IN (...)`), so the dispatcher claiming a
job and a CancelJob racing it can never both win. Dataset deletion and job creation take the
same per-dataset lock (PostgreSQL advisory lock; SQLite's write lock already serializes), so a
job can never be queued on a dataset that is being deleted. Likewise creating a dataset or a
job and tombstoning its tenant take a per-tenant lock, so nothing is stored for a tenant once
its data is being purged (tenants.py).

Listings are newest first with keyset page tokens (services/registry/paging.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterable

from sqlalchemy import and_, delete, func, or_, select, update

from services.common.errors import FailedPrecondition, NotFound
from services.registry import paging
from services.trainer.db import TrainerDatabase
from services.trainer.db.models import DatasetRow, DeletedTenantRow, FeedStateRow, JobRow, utcnow
from services.trainer.records import ACTIVE, QUEUED, RUNNING, DatasetRecord, JobRecord

_DATASET_FIELDS = [field.name for field in dataclasses.fields(DatasetRecord)]
_JOB_FIELDS = [field.name for field in dataclasses.fields(JobRecord) if field.metadata.get("stored", True)]


def _dataset(row: DatasetRow) -> DatasetRecord:
    return DatasetRecord(**{name: getattr(row, name) for name in _DATASET_FIELDS})


def _job(row: JobRow) -> JobRecord:
    return JobRecord(**{name: getattr(row, name) for name in _JOB_FIELDS})


def _for_request(session, row_type, tenant_id: str, request_id: str):
    """The tenant's dataset or job (by `row_type`) stored under this idempotency key, as a record."""
    row = session.scalars(select(row_type).where(row_type.tenant_id == tenant_id,
                                                 row_type.request_id == request_id)).first()
    return None if row is None else (_dataset if row_type is DatasetRow else _job)(row)


def _newest_first(query, model, page: paging.Page):
    if page.after:
        created, last_id = dt.datetime.fromisoformat(page.after[0]), page.after[1]
        query = query.where(or_(model.created_at < created, and_(model.created_at == created, model.id < last_id)))
    return query.order_by(model.created_at.desc(), model.id.desc()).limit(page.size + 1)


def _page_key(record) -> list:
    return [record.created_at.isoformat(), record.id]


def _next_tenant(session) -> str | None:
    """The tenant whose oldest queued job runs next: fair across tenants, FIFO within one.

    Devices are shared by every tenant, and a plain FIFO let one tenant that queued a hundred
    jobs hold them all until its last job ran, every other tenant waiting behind. So tenants
    take turns: fewest jobs running first, then the one whose last job started longest ago
    (never: first), then the one whose oldest queued job is oldest. A deleted tenant's queued
    job is never started, even before its purge cancels it."""
    deleted = select(DeletedTenantRow.tenant_id)
    heads = session.execute(select(JobRow.tenant_id, func.min(JobRow.created_at))
                            .where(JobRow.state == QUEUED, JobRow.tenant_id.not_in(deleted))
                            .group_by(JobRow.tenant_id)).all()
    if not heads:
        return None
    waiting = [tenant_id for tenant_id, _ in heads]
    running = dict(session.execute(select(JobRow.tenant_id, func.count())
                                   .where(JobRow.state == RUNNING, JobRow.tenant_id.in_(waiting))
                                   .group_by(JobRow.tenant_id)).all())
    last_start = dict(session.execute(select(JobRow.tenant_id, func.max(JobRow.started_at))
                                      .where(JobRow.tenant_id.in_(waiting), JobRow.started_at.is_not(None))
                                      .group_by(JobRow.tenant_id)).all())

    def turn(head):
        tenant_id, oldest = head
        started = last_start.get(tenant_id)
        return running.get(tenant_id, 0), started is not None, started or oldest, oldest, tenant_id

    return min(heads, key=turn)[0]


class TrainerStore:
    def __init__(self, db: TrainerDatabase) -> None:
        self.db = db

    # --- datasets ---

    def _refuse_deleted_tenant(self, session, tenant_id: str, field: str) -> None:
        self.db.lock(session, "trainer-tenant", tenant_id)
        if session.get(DeletedTenantRow, tenant_id) is not None:
            raise NotFound(f"tenant '{tenant_id}' not found", reason="TENANT_NOT_FOUND", field=field)

    def insert_dataset(self, record: DatasetRecord, tenant_field: str = "tenant") -> DatasetRecord:
        """Stores `record`; returns it, or the dataset an earlier upload stored under the same request_id."""
        with self.db.write() as session:
            self._refuse_deleted_tenant(session, record.tenant_id, tenant_field)
            if (earlier := self._earlier(session, DatasetRow, record)) is not None:
                return earlier
            session.add(DatasetRow(**dataclasses.asdict(record)))
        return record

    def dataset_for_request(self, tenant_id: str, request_id: str) -> DatasetRecord | None:
        with self.db.read() as session:
            return _for_request(session, DatasetRow, tenant_id, request_id)

    def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        with self.db.read() as session:
            row = session.get(DatasetRow, dataset_id) if dataset_id else None
            return _dataset(row) if row is not None else None

    def list_datasets(self, tenant_id: str | None, page: paging.Page) -> tuple[list[DatasetRecord], str]:
        with self.db.read() as session:
            query = select(DatasetRow)
            if tenant_id is not None:
                query = query.where(DatasetRow.tenant_id == tenant_id)
            rows = [_dataset(row) for row in session.scalars(_newest_first(query, DatasetRow, page))]
        return paging.split(rows, page, _page_key)

    def delete_dataset(self, dataset_id: str, tenant_id: str | None) -> DatasetRecord:
        """Removes the row (the caller removes the blob); refused while active jobs use it."""
        with self.db.write() as session:
            self.db.lock(session, "trainer-dataset", dataset_id)
            row = session.get(DatasetRow, dataset_id) if dataset_id else None
            if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
                raise NotFound(f"dataset '{dataset_id}' not found", reason="DATASET_NOT_FOUND", field="id")
            users = list(session.scalars(select(JobRow.id).where(JobRow.dataset_id == dataset_id,
                                                                 JobRow.state.in_(ACTIVE)).limit(5)))
            if users:
                raise FailedPrecondition(f"dataset '{dataset_id}' is used by queued or running job(s) "
                                         f"{', '.join(users)}; cancel them or wait until they finish",
                                         reason="DATASET_IN_USE", field="id")
            record = _dataset(row)
            session.delete(row)
        return record

    # --- jobs ---

    def insert_job(self, record: JobRecord) -> JobRecord:
        """Stores `record`; returns it, or the job an earlier call stored under the same request_id."""
        with self.db.write() as session:
            if (earlier := self._earlier(session, JobRow, record)) is not None:
                return earlier
            self.db.lock(session, "trainer-dataset", record.dataset_id)
            if session.get(DatasetRow, record.dataset_id) is None:
                raise NotFound(f"dataset '{record.dataset_id}' not found", reason="DATASET_NOT_FOUND",
                               field="dataset_id")
            self._refuse_deleted_tenant(session, record.tenant_id, "tenant")
            session.add(JobRow(**{name: getattr(record, name) for name in _JOB_FIELDS}))
        return record

    def dataset_blob_keys(self) -> set[str]:
        with self.db.read() as session:
            return set(session.scalars(select(DatasetRow.blob_key)))

    def job_for_request(self, tenant_id: str, request_id: str) -> JobRecord | None:
        with self.db.read() as session:
            return _for_request(session, JobRow, tenant_id, request_id)

    def _earlier(self, session, row_type, record):
        """The row an earlier call stored under `record`'s request_id (None without a key). Two
        concurrent retries: the second waits on the lock, then finds the first's row."""
        if record.request_id is None:
            return None
        self.db.lock(session, f"{row_type.__tablename__}-request", record.tenant_id, record.request_id)
        return _for_request(session, row_type, record.tenant_id, record.request_id)

    def get_job(self, job_id: str) -> JobRecord | None:
        with self.db.read() as session:
            row = session.get(JobRow, job_id) if job_id else None
            return _job(row) if row is not None else None

    def list_jobs(self, tenant_id: str | None, states: Iterable[str],
                  page: paging.Page) -> tuple[list[JobRecord], str]:
        with self.db.read() as session:
            query = select(JobRow)
            if tenant_id is not None:
                query = query.where(JobRow.tenant_id == tenant_id)
            states = list(states)
            if states:
                query = query.where(JobRow.state.in_(states))
            rows = [_job(row) for row in session.scalars(_newest_first(query, JobRow, page))]
        return paging.split(rows, page, _page_key)

    def jobs_in_state(self, state: str) -> list[JobRecord]:
        with self.db.read() as session:
            query = select(JobRow).where(JobRow.state == state).order_by(JobRow.created_at, JobRow.id)
            return [_job(row) for row in session.scalars(query)]

    def claim_next(self) -> JobRecord | None:
        """The next queued job (see _next_tenant), now marked running; None when nothing is queued."""
        with self.db.write() as session:
            tenant_id = _next_tenant(session)
            if tenant_id is None:
                return None
            row = session.scalars(select(JobRow).where(JobRow.state == QUEUED, JobRow.tenant_id == tenant_id)
                                  .order_by(JobRow.created_at, JobRow.id).limit(1)).first()
            row.state = RUNNING
            row.started_at = row.started_at or utcnow()
            return _job(row)

    def transition(self, job_id: str, from_states: Iterable[str], **changes) -> JobRecord | None:
        """Applies `changes` if the job is in one of `from_states`; the updated record or None."""
        with self.db.write() as session:
            result = session.execute(update(JobRow).where(JobRow.id == job_id, JobRow.state.in_(list(from_states)))
                                     .values(**changes))
            if result.rowcount == 0:
                return None
            return _job(session.get(JobRow, job_id, populate_existing=True))

    def save_progress(self, record: JobRecord) -> None:
        """Writes the live figures of a running job (not its state)."""
        fields = ("step", "epoch", "loss", "eval_loss", "learning_rate", "tokens_per_second", "eta_seconds")
        with self.db.write() as session:
            session.execute(update(JobRow).where(JobRow.id == record.id, JobRow.state == RUNNING)
                            .values(**{name: getattr(record, name) for name in fields}))

    # --- deleted tenants and the Registry change feed ---

    def mark_tenant_deleted(self, tenant_id: str) -> None:
        """Tombstones the tenant: from the commit on, no dataset or job can be created for it."""
        with self.db.write() as session:
            self.db.lock(session, "trainer-tenant", tenant_id)
            if session.get(DeletedTenantRow, tenant_id) is None:
                session.add(DeletedTenantRow(tenant_id=tenant_id, deleted_at=utcnow()))

    def active_job_ids(self, tenant_id: str) -> list[str]:
        with self.db.read() as session:
            return list(session.scalars(select(JobRow.id).where(JobRow.tenant_id == tenant_id,
                                                                JobRow.state.in_(ACTIVE))
                                        .order_by(JobRow.created_at, JobRow.id)))

    def delete_tenant_rows(self, tenant_id: str) -> tuple[list[str], list[str]]:
        """Deletes the tenant's datasets and jobs; (their blob keys, the job ids) for the files."""
        with self.db.write() as session:
            blob_keys = list(session.scalars(select(DatasetRow.blob_key).where(DatasetRow.tenant_id == tenant_id)))
            job_ids = list(session.scalars(select(JobRow.id).where(JobRow.tenant_id == tenant_id).order_by(JobRow.id)))
            session.execute(delete(JobRow).where(JobRow.tenant_id == tenant_id))
            session.execute(delete(DatasetRow).where(DatasetRow.tenant_id == tenant_id))
        return blob_keys, job_ids

    def tenant_ids(self) -> set[str]:
        """Every tenant that has a dataset or a job here."""
        with self.db.read() as session:
            return set(session.scalars(select(DatasetRow.tenant_id).distinct())) | \
                set(session.scalars(select(JobRow.tenant_id).distinct()))

    def feed_cursor(self) -> int | None:
        with self.db.read() as session:
            row = session.get(FeedStateRow, 1)
            return row.cursor if row is not None else None

    def save_feed_cursor(self, cursor: int | None) -> None:
        with self.db.write() as session:
            row = session.get(FeedStateRow, 1)
            if row is None:
                session.add(FeedStateRow(id=1, cursor=cursor))
            else:
                row.cursor = cursor
