"""OpenAI's Fine-tuning API, backed by the Trainer's jobs: a create body -> a StartJob, a
Trainer job -> an OpenAI `fine_tuning.job`, and the calls on behalf of one tenant.

    POST /v1/fine_tuning/jobs                  create (SDK: client.fine_tuning.jobs.create)
    GET  /v1/fine_tuning/jobs                  the caller's jobs, newest first (`after`, `limit`)
    GET  /v1/fine_tuning/jobs/{id}             one of them
    POST /v1/fine_tuning/jobs/{id}/cancel      cancel a queued or running one
    GET  /v1/fine_tuning/jobs/{id}/events      its events, newest first (openai_fine_tuning_events.py)

Job ids are the Trainer's, so gRPC and HTTP callers see one job. Calls go to the Trainer with
the caller's own API key: another tenant's job is a 404 exactly like an unknown id.

Decisions:
- The model name. The Trainer binds a deployment name to the adapter it publishes, and the
  router resolves deployment names (resolution.py), so the job asks for the deployment
  `ft:<base>:<tenant>:<suffix>:<8 hex>`, OpenAI's shape (the Registry allows ':' in deployment
  names). Once the job succeeds, that name works as `model` in chat and completions, is listed
  by /v1/models, and is the job's `fine_tuned_model` (null before). The 8 hex are random, or
  derived from the Idempotency-Key, so that a retried create asks for the very same job: the
  Trainer compares a retry's settings with the first call's. Parts are shortened, base model
  first, to keep the name within the 128 characters a model name may have.
- `model` must be a base model. A deployment (an `ft:` model included) is a 400: the Trainer
  trains a new adapter on a base model and cannot continue from an existing one, and training
  on the deployment's base while its adapter is ignored is not what the caller asked for.
- Hyperparameters, from `hyperparameters` or `method.supervised.hyperparameters`, "auto" (or
  absent) meaning the Trainer's defaults: `n_epochs` -> epochs (default 3), `batch_size` -> the
  micro batch (default 4), `learning_rate_multiplier` x 2e-4 (the Trainer's default rate, so 1
  is that default) -> the learning rate. The LoRA itself takes the Trainer's defaults (rank 16
  on all seven projections).
- What cannot be honoured is a 400 naming it, never ignored: `method` other than supervised,
  `validation_file` (the Trainer has no separate evaluation file), `integrations`, `metadata`
  (the Trainer keeps neither), an unknown parameter.
- States: queued -> "queued", running -> "running" (also while it publishes the adapter),
  succeeded / failed / cancelled alike. The Trainer validates a file when it is uploaded, not
  when a job starts, so "validating_files" never shows.
- An `Idempotency-Key` header makes create safe to retry (the Trainer's request_id); the
  SDK resends the headers of a call on each of its retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from services.common.errors import InvalidArgument, LoraplexError, NotFound
from services.common.fields import MAX_MODEL_NAME
from services.router.auth import Caller
from services.router.openai_fine_tuning_events import job_events
from services.router.openai_trainer_terms import in_openai_terms, trainer_request_id
from services.router.resolution import Target

#: The Trainer's default learning rate: learning_rate_multiplier 1.
BASE_LEARNING_RATE = 2e-4
CREATE_FIELDS = {"model", "training_file", "hyperparameters", "method", "suffix", "seed", "validation_file",
                 "integrations", "metadata"}
HYPERPARAMETERS = ("n_epochs", "batch_size", "learning_rate_multiplier")
SUFFIX = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_SEED = 2**63 - 1
#: The largest hyperparameter passed on: it fits every field it goes to (uint32, float32).
WIRE_MAX = 2**31 - 1
STATUSES = {"queued": "queued", "running": "running", "succeeded": "succeeded", "failed": "failed",
            "cancelled": "cancelled"}
#: Trainer field -> the create body's name for it.
CREATE_PARAMS = {"dataset_id": "training_file", "base_model": "model", "training.epochs": "hyperparameters.n_epochs",
                 "training.batch_size": "hyperparameters.batch_size",
                 "training.learning_rate": "hyperparameters.learning_rate_multiplier", "training.seed": "seed",
                 "deployment_name": "suffix", "output_adapter_name": "suffix", "request_id": "Idempotency-Key"}


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A StartJob, as the router asks for it (LoRA settings: the Trainer's defaults)."""

    base_model: str
    dataset_id: str
    output_adapter_name: str
    deployment_name: str
    epochs: float | None = None
    learning_rate: float | None = None
    batch_size: int = 0  # 0: the Trainer's default
    seed: int = 0
    request_id: str = ""


@dataclasses.dataclass(frozen=True)
class TrainerJob:
    """A Trainer job, as the Fine-tuning API shows it (times in unix seconds)."""

    id: str
    tenant_id: str
    state: str  # queued | running | succeeded | failed | cancelled
    base_model: str
    dataset_id: str
    deployment_name: str
    epochs: float | None
    max_steps: int | None
    learning_rate: float
    batch_size: int
    seed: int
    step: int = 0
    total_steps: int = 0
    loss: float | None = None
    eta_seconds: float | None = None
    error: str = ""
    waiting_for: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None


class JobStore(Protocol):
    """The Trainer's jobs, called with the caller's `authorization` header (NotFound for an
    unknown or another tenant's id)."""

    async def start_job(self, authorization: str, spec: JobSpec) -> TrainerJob: ...

    async def get_job(self, authorization: str, job_id: str) -> TrainerJob: ...

    def list_jobs(self, authorization: str) -> AsyncIterator[TrainerJob]: ...

    async def cancel_job(self, authorization: str, job_id: str) -> TrainerJob: ...


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"{field} {message}", field=field)


def _auto_or_number(settings: dict, name: str, integer: bool) -> float | None:
    """A hyperparameter: None for "auto" or absent, else a positive number (an integer if asked).
    The Trainer checks the ranges (one source of truth); here a value only has to fit its
    protobuf field, where JSON's unbounded integers would fail as a 500."""
    value, field = settings.get(name), f"hyperparameters.{name}"
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise _bad(field, f"must be \"auto\" or {'an integer' if integer else 'a number'}, got {str(value)[:80]!r}")
    if not (0 < value <= WIRE_MAX) or isinstance(value, float) and not math.isfinite(value):
        raise _bad(field, f"must be > 0 and at most {WIRE_MAX}, got {str(value)[:80]}")
    return value


def _hyperparameters(body: dict) -> dict:
    method, plain = body.get("method"), body.get("hyperparameters")
    settings: Any = plain
    if method is not None:
        if not isinstance(method, dict) or method.get("type") != "supervised":
            kind = method.get("type") if isinstance(method, dict) else method
            raise InvalidArgument(f"method.type must be \"supervised\" (the only fine-tuning method here), got "
                                  f"{str(kind)[:80]!r}", field="method.type")
        supervised = method.get("supervised") or {}
        if not isinstance(supervised, dict):
            raise _bad("method.supervised", "must be an object")
        if supervised.get("hyperparameters") is not None:
            if plain is not None:
                raise InvalidArgument("give hyperparameters either in method.supervised.hyperparameters or in the "
                                      "deprecated hyperparameters, not both", field="hyperparameters")
            settings = supervised["hyperparameters"]
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise _bad("hyperparameters", "must be an object")
    unknown = sorted(set(settings) - set(HYPERPARAMETERS))
    if unknown:
        raise InvalidArgument(f"unrecognized hyperparameter {unknown[0][:80]!r}; supported: "
                              f"{', '.join(HYPERPARAMETERS)}", field=f"hyperparameters.{unknown[0][:80]}")
    return settings


def _refuse_unsupported(body: dict) -> None:
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise InvalidArgument(f"unrecognized request argument (not part of this API): {', '.join(unknown)[:200]}",
                              field=unknown[0][:80])
    if body.get("validation_file") is not None:
        raise _bad("validation_file", "is not supported: the trainer takes one training file")
    if body.get("integrations"):
        raise _bad("integrations", "are not supported (no Weights and Biases reporting here)")
    if body.get("metadata"):
        raise _bad("metadata", "is not supported: the trainer does not keep it")


def _text(body: dict, field: str, required: bool = True) -> str:
    value = body.get(field)
    if value in (None, "") and not required:
        return ""
    if not isinstance(value, str) or not value:
        raise _bad(field, "is required" if value is None else f"must be a non-empty string, got {str(value)[:80]!r}")
    return value


def fine_tuned_model_name(base_model: str, tenant_name: str, suffix: str, tag: str) -> str:
    """`ft:<base>:<tenant>:<suffix>:<tag>`, its base then its tenant shortened if it would be
    longer than a model name may be."""
    over = len(f"ft:{base_model}:{tenant_name}:{suffix}:{tag}") - MAX_MODEL_NAME
    if over > 0:
        base_model = base_model[:max(1, len(base_model) - over)]
        over = len(f"ft:{base_model}:{tenant_name}:{suffix}:{tag}") - MAX_MODEL_NAME
        tenant_name = tenant_name[:max(1, len(tenant_name) - over)] if over > 0 else tenant_name
    return f"ft:{base_model}:{tenant_name}:{suffix}:{tag}"


def job_spec(body: dict, caller: Caller, base_model: str, idempotency_key: str) -> JobSpec:
    """The StartJob for a create body whose `model` resolved to `base_model`."""
    _refuse_unsupported(body)
    settings = _hyperparameters(body)
    suffix = _text(body, "suffix", required=False)
    if suffix and not SUFFIX.fullmatch(suffix):
        raise _bad("suffix", f"must be 1-64 characters of letters, digits, '.', '_' and '-', got {suffix[:80]!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise _bad("seed", f"must be an integer in [0, {MAX_SEED}], got {str(seed)[:80]!r}")
    # Random, or the same for every retry under one Idempotency-Key (see the module docstring).
    tag = (hashlib.sha256(f"ft-name:{idempotency_key}".encode()).hexdigest()[:8] if idempotency_key
           else secrets.token_hex(4))
    multiplier = _auto_or_number(settings, "learning_rate_multiplier", integer=False)
    return JobSpec(
        base_model=base_model, dataset_id=_text(body, "training_file"),
        output_adapter_name=f"ft-{suffix[:50]}-{tag}" if suffix else f"ft-{tag}",
        deployment_name=fine_tuned_model_name(base_model, caller.tenant_name, suffix, tag),
        epochs=_auto_or_number(settings, "n_epochs", integer=True),
        learning_rate=None if multiplier is None else multiplier * BASE_LEARNING_RATE,
        batch_size=int(_auto_or_number(settings, "batch_size", integer=True) or 0), seed=seed or 0,
        request_id=trainer_request_id(idempotency_key, "job"))


def _whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def job_object(job: TrainerJob) -> dict:
    # learning rates cross the wire as float32: the multiplier is shown as the caller wrote it
    multiplier = float(f"{job.learning_rate / BASE_LEARNING_RATE:.6g}")
    hyperparameters = {"n_epochs": "auto" if job.epochs is None else _whole(job.epochs),
                       "batch_size": job.batch_size, "learning_rate_multiplier": multiplier}
    error = {"code": "training_failed", "message": job.error, "param": None} if job.state == "failed" else None
    finish = job.eta_seconds is not None and job.state == "running" and job.started_at is not None
    return {
        "object": "fine_tuning.job", "id": job.id, "model": job.base_model, "created_at": int(job.created_at),
        "finished_at": None if job.finished_at is None else int(job.finished_at),
        "fine_tuned_model": job.deployment_name if job.state == "succeeded" and job.deployment_name else None,
        "organization_id": job.tenant_id, "result_files": [], "status": STATUSES[job.state],
        "validation_file": None, "training_file": job.dataset_id, "hyperparameters": hyperparameters,
        "trained_tokens": None, "error": error, "seed": job.seed,
        "estimated_finish": int(time.time() + job.eta_seconds) if finish else None, "integrations": [],
        "metadata": None, "user_provided_suffix": _suffix_of(job.deployment_name),
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}}


def _suffix_of(model_name: str) -> str | None:
    parts = model_name.split(":")
    return (parts[3] or None) if len(parts) == 5 and parts[0] == "ft" else None


def no_such_job(job_id: str) -> NotFound:
    return NotFound(f"fine-tuning job '{job_id[:200]}' not found", reason="JOB_NOT_FOUND", field="fine_tuning_job_id")


class FineTuningApi:
    """The Fine-tuning API's calls, each on behalf of a verified caller (`authorization` is the
    header it authenticated with, passed on to the Trainer)."""

    def __init__(self, trainer: JobStore, resolve: Callable[[Caller, str], Awaitable[Target]]) -> None:
        self.trainer, self.resolve = trainer, resolve

    async def create(self, caller: Caller, authorization: str, body: dict, idempotency_key: str) -> dict:
        model = _text(body, "model")
        target = await self.resolve(caller, model)  # 404 model_not_found for unknown and other tenants' names
        if target.adapter_id:
            raise InvalidArgument(f"model '{model}' is a fine-tuned model; fine-tuning starts from a base model "
                                  f"(this one's is '{target.base_model}'): a new adapter is trained on it",
                                  reason="MODEL_NOT_A_BASE_MODEL", field="model")
        spec = job_spec(body, caller, target.base_model, idempotency_key)
        try:
            return job_object(await self.trainer.start_job(authorization, spec))
        except NotFound as exc:
            if exc.metadata.get("field") == "dataset_id":
                raise NotFound(f"training_file '{spec.dataset_id[:200]}' not found: upload it first (POST /v1/files, "
                               "purpose fine-tune)", reason="FILE_NOT_FOUND", field="training_file") from None
            raise in_openai_terms(exc, CREATE_PARAMS) from None
        except LoraplexError as exc:
            raise in_openai_terms(exc, CREATE_PARAMS) from None

    async def retrieve(self, authorization: str, job_id: str) -> dict:
        return job_object(await self._get(authorization, job_id))

    async def list(self, authorization: str, limit: int, after: str) -> dict:
        page: list[TrainerJob] = []
        passed = not after  # OpenAI's cursor is the last job id of the previous page
        async with contextlib.aclosing(self.trainer.list_jobs(authorization)) as jobs:  # closed on break
            async for job in jobs:
                if passed:
                    page.append(job)
                    if len(page) > limit:  # one more than asked: there is another page
                        break
                passed = passed or job.id == after
        return {"object": "list", "data": [job_object(job) for job in page[:limit]], "has_more": len(page) > limit}

    async def cancel(self, authorization: str, job_id: str) -> dict:
        await self._get(authorization, job_id)
        try:
            return job_object(await self.trainer.cancel_job(authorization, job_id))
        except NotFound:
            raise no_such_job(job_id) from None
        except LoraplexError as exc:  # already finished, or already published
            raise in_openai_terms(exc, {"id": "fine_tuning_job_id"}) from None

    async def events(self, authorization: str, job_id: str, limit: int, after: str) -> dict:
        events = job_events(await self._get(authorization, job_id), time.time())
        if after:
            ids = [event["id"] for event in events]
            events = events[ids.index(after) + 1:] if after in ids else []
        return {"object": "list", "data": events[:limit], "has_more": len(events) > limit}

    async def _get(self, authorization: str, job_id: str) -> TrainerJob:
        try:
            return await self.trainer.get_job(authorization, job_id)
        except NotFound:
            raise no_such_job(job_id) from None
