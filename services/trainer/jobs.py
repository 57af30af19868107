"""Jobs: StartJob's up-front checks, reads (live figures for running jobs), cancel and watch.

StartJob refuses before queueing anything: unknown dataset or base model (NOT_FOUND, other
tenants' datasets included), bad hyperparameters (INVALID_ARGUMENT naming the field, see
hyperparams.py), a dataset validated for another base model (its token lengths would not
hold), and a deployment name bound by another tenant or naming a base model (ALREADY_EXISTS,
as the Registry would answer at publication, after the whole run).

A `request_id` makes StartJob safe to retry: the tenant's job stored under that key is returned
as it is now, before any other check (a retry must not fail because the dataset was deleted
after the first call queued its job), and nothing new is queued. The key is compared with a
digest of the request's settings, so reusing it for another job is refused instead of silently
answering with the wrong one.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from services.common.errors import AlreadyExists, InvalidArgument, NotFound
from services.registry import paging
from services.trainer.auth import Authenticator
from services.trainer.base_models import BaseModels
from services.trainer.db.models import utcnow
from services.trainer.events import EventHub
from services.trainer.hyperparams import (LoraRequest, TrainingRequest, check_names, plan_schedule, resolve_lora,
                                          resolve_training)
from services.trainer.queue import JobQueue
from services.common.fields import check_request_id, require
from services.trainer.records import QUEUED, RUNNING, SNAPSHOT, JobRecord, Principal, request_digest
from services.trainer.registry_client import RegistryClient
from services.trainer.store import TrainerStore


@dataclasses.dataclass(frozen=True)
class JobRequest:
    tenant: str
    base_model: str
    dataset_id: str
    lora: LoraRequest
    training: TrainingRequest
    output_adapter_name: str
    deployment_name: str
    request_id: str = ""

    def digest(self) -> str:
        return request_digest(self)


class JobService:
    def __init__(self, store: TrainerStore, queue: JobQueue, hub: EventHub, models: BaseModels, auth: Authenticator,
                 registry: RegistryClient, run: Callable[..., Awaitable], max_rank: int) -> None:
        self.store, self.queue, self.hub, self.models = store, queue, hub, models
        self.auth, self.registry, self.run, self.max_rank = auth, registry, run, max_rank

    async def start(self, principal: Principal, request: JobRequest) -> JobRecord:
        tenant_id = await self.auth.tenant(principal, request.tenant)
        if request.request_id:
            earlier = await self._earlier_job(tenant_id, request)
            if earlier is not None:
                return earlier
        check_names(request.output_adapter_name, request.deployment_name)
        require(request.dataset_id, "dataset_id")
        lora = resolve_lora(request.lora, self.max_rank)
        dataset = await self.run(self.store.get_dataset, request.dataset_id)
        if dataset is None or dataset.tenant_id != tenant_id:
            raise NotFound(f"dataset '{request.dataset_id}' not found", reason="DATASET_NOT_FOUND", field="dataset_id")
        base = await self.models.get(request.base_model or dataset.base_model)
        if base.name != dataset.base_model:
            raise InvalidArgument(f"dataset '{dataset.id}' was checked with the tokenizer of base model "
                                  f"'{dataset.base_model}', not '{base.name}'; upload it again with base_model "
                                  f"'{base.name}'", reason="DATASET_BASE_MISMATCH", field="base_model")
        training = resolve_training(request.training, base.max_position_embeddings)
        schedule = plan_schedule(training, dataset.num_examples, dataset.longest_example)
        if request.deployment_name:
            await self._check_deployment_name(request.deployment_name, tenant_id)
        record = JobRecord(id="job_" + uuid.uuid4().hex, tenant_id=tenant_id, state=QUEUED, base_model=base.name,
                           dataset_id=dataset.id, lora=dataclasses.asdict(lora),
                           training=dataclasses.asdict(training), output_adapter_name=request.output_adapter_name,
                           deployment_name=request.deployment_name, total_steps=schedule.total_steps,
                           created_at=utcnow(), request_id=request.request_id or None,
                           request_digest=request.digest())
        record.lora["target_modules"] = list(lora.target_modules)
        stored = await self.run(self.store.insert_job, record)
        if stored.id != record.id:  # a concurrent call with the same request_id stored its job first
            return self._same_request(stored, request)
        self.queue.notify()
        return record

    async def _check_deployment_name(self, name: str, tenant_id: str) -> None:
        """The Registry's binding rules, checked now: at publication a refusal comes after the
        whole training run, and the job ends FAILED with its adapter published but not bound."""
        if await self.registry.is_base_model(name):  # base model and deployment names share `model`
            raise AlreadyExists(f"'{name}' is the name of a base model; a deployment needs a name of its own",
                                reason="NAME_IS_BASE_MODEL", field="deployment_name")
        if await self.registry.deployment_taken(name, tenant_id):
            raise AlreadyExists(f"deployment name '{name}' is taken", reason="DEPLOYMENT_EXISTS",
                                field="deployment_name")

    async def _earlier_job(self, tenant_id: str, request: JobRequest) -> JobRecord | None:
        check_request_id(request.request_id)
        earlier = await self.run(self.store.job_for_request, tenant_id, request.request_id)
        return self._same_request(earlier, request) if earlier is not None else None

    def _same_request(self, earlier: JobRecord, request: JobRequest) -> JobRecord:
        if earlier.request_digest != request.digest():
            raise AlreadyExists(f"request_id '{request.request_id}' already queued job '{earlier.id}' with other "
                                "settings; use a new request_id for a different job",
                                reason="REQUEST_ID_REUSED", field="request_id")
        return self.queue.live(earlier.id) or earlier

    async def get(self, principal: Principal, job_id: str) -> JobRecord:
        require(job_id, "id")
        record = self.queue.live(job_id) or await self.run(self.store.get_job, job_id)
        if record is None or not principal.owns(record.tenant_id):
            raise NotFound(f"job '{job_id}' not found", reason="JOB_NOT_FOUND", field="id")
        return record

    async def list(self, principal: Principal, tenant: str, states: list[str],
                   page: paging.Page) -> tuple[list[JobRecord], str]:
        tenant_id = await self.auth.tenant_filter(principal, tenant)
        rows, token = await self.run(self.store.list_jobs, tenant_id, states, page)
        # Live figures only for a row read as running (and live records are always running): a
        # row read as queued may have started since, one read as finished may still have its
        # runner for a moment, and either would then be listed in a state outside `states`.
        # Every listed job keeps its row's state, and the page (and its token) its rows.
        return [(self.queue.live(row.id) if row.state == RUNNING else None) or row for row in rows], token

    async def cancel(self, principal: Principal, job_id: str) -> JobRecord:
        await self.get(principal, job_id)
        return await self.queue.cancel(job_id)

    async def watch(self, principal: Principal, job_id: str) -> AsyncIterator[tuple[str, JobRecord]]:
        """A snapshot first, then events until the job reaches a terminal state."""
        await self.get(principal, job_id)
        events = self.hub.subscribe(job_id)  # before the snapshot: nothing can slip between the two
        try:
            current = await self.get(principal, job_id)
            yield SNAPSHOT, current
            if current.is_terminal:
                return
            while True:
                kind, record = await events.get()
                yield kind, record
                if record.is_terminal:
                    return
        finally:
            self.hub.unsubscribe(job_id, events)
