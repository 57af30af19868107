"""Job hyperparameters: defaults, up-front validation and the step schedule.

Everything a job will do is decided when StartJob answers: defaults are applied, every value
is range-checked (InvalidArgument names the field, e.g. `training.learning_rate`), and the
schedule (train/eval split, optimizer steps, checkpoint interval) is computed from the
dataset's example count, so no bad setting is discovered mid-job.

Schedule: the training split is shuffled per epoch (seeded) into micro-batches of batch_size;
`gradient_accumulation_steps` micro-batches make an optimizer step, the last step of an epoch
possibly taking fewer. `epochs` may be fractional; `max_steps` overrides it and cycles epochs.
"""

from __future__ import annotations

import dataclasses
import math
import re

from services.common.errors import InvalidArgument

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEDULES = ("linear", "cosine", "constant")
# The Registry's rules, matched whole (fullmatch): with re.match, `$` also matches before a
# final newline, so "fin\n" passed here and the Registry refused it only at publication.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
DEFAULT_RANK, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_BATCH, DEFAULT_SEQ_LEN = 16, 3.0, 2e-4, 4, 1024
MAX_EPOCHS, MAX_STEPS, MAX_BATCH, MAX_ACCUMULATION, MAX_LR, MAX_EVAL_FRACTION = 100, 10_000_000, 1024, 1024, 1.0, 0.5
MIN_SEQ_LEN = 8
MAX_SEED = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class LoraRequest:
    """As the caller sent it: None / 0 / empty mean "use the default"."""

    r: int = 0
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    use_rslora: bool = False


@dataclasses.dataclass(frozen=True)
class TrainingRequest:
    epochs: float | None = None
    max_steps: int | None = None
    learning_rate: float | None = None
    lr_schedule: str = ""  # "" = default
    warmup_steps: int = 0
    batch_size: int = 0
    gradient_accumulation_steps: int = 0
    max_seq_len: int = 0
    seed: int = 0
    eval_fraction: float = 0.0
    checkpoint_every_steps: int = 0


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    use_rslora: bool


@dataclasses.dataclass(frozen=True)
class TrainingSettings:
    epochs: float | None
    max_steps: int | None
    learning_rate: float
    lr_schedule: str
    warmup_steps: int
    batch_size: int
    gradient_accumulation_steps: int
    max_seq_len: int
    seed: int
    eval_fraction: float
    checkpoint_every_steps: int  # 0: once per epoch


@dataclasses.dataclass(frozen=True)
class Schedule:
    num_train: int
    num_eval: int
    steps_per_epoch: int
    total_steps: int
    checkpoint_every: int


def _bad(field: str, message: str, **metadata: object) -> InvalidArgument:
    return InvalidArgument(f"{field} {message}", reason="BAD_HYPERPARAMETER", field=field, **metadata)


def _finite(field: str, value: float) -> float:
    if not math.isfinite(value):
        raise _bad(field, f"must be a finite number, got {value}")
    return value


def resolve_lora(request: LoraRequest, max_rank: int) -> LoraSettings:
    r = request.r or DEFAULT_RANK
    if not 1 <= r <= max_rank:
        raise _bad("lora.r", f"must be in [1, {max_rank}] (the registry's rank limit), got {r}", actual=r)
    alpha = 2.0 * r if request.alpha is None else _finite("lora.alpha", request.alpha)
    if alpha <= 0:
        raise _bad("lora.alpha", f"must be > 0, got {alpha}", actual=alpha)
    dropout = _finite("lora.dropout", request.dropout)
    if not 0 <= dropout < 1:
        raise _bad("lora.dropout", f"must be in [0, 1), got {dropout}", actual=dropout)
    targets = request.target_modules or TARGET_MODULES
    for module in targets:
        if module not in TARGET_MODULES:
            # Echoes of caller text are cut short: error details travel in gRPC trailers,
            # which a client refuses beyond a few KiB (the caller would see no reason at all).
            raise _bad("lora.target_modules", f"has unknown module {module!r:.80}; choose from "
                       f"{', '.join(TARGET_MODULES)}", actual=f"{module!r:.80}")
    if len(set(targets)) != len(targets):
        raise _bad("lora.target_modules", "lists a module twice")
    ordered = tuple(module for module in TARGET_MODULES if module in targets)
    return LoraSettings(r, float(alpha), float(dropout), ordered, bool(request.use_rslora))


def resolve_training(request: TrainingRequest, max_position_embeddings: int) -> TrainingSettings:
    if request.epochs is not None and request.max_steps is not None:
        raise _bad("training.epochs", "and training.max_steps are exclusive: set one of them")
    epochs, max_steps = request.epochs, request.max_steps
    if max_steps is not None and not 1 <= max_steps <= MAX_STEPS:
        raise _bad("training.max_steps", f"must be in [1, {MAX_STEPS}], got {max_steps}", actual=max_steps)
    if max_steps is None:
        epochs = DEFAULT_EPOCHS if epochs is None else _finite("training.epochs", epochs)
        if not 0 < epochs <= MAX_EPOCHS:
            raise _bad("training.epochs", f"must be in (0, {MAX_EPOCHS}], got {epochs}", actual=epochs)
    lr = DEFAULT_LR if request.learning_rate is None else _finite("training.learning_rate", request.learning_rate)
    if not 0 < lr <= MAX_LR:
        raise _bad("training.learning_rate", f"must be in (0, {MAX_LR}], got {lr}", actual=lr)
    schedule = request.lr_schedule or "linear"
    if schedule not in SCHEDULES:
        raise _bad("training.lr_schedule", f"must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    batch = request.batch_size or DEFAULT_BATCH
    if not 1 <= batch <= MAX_BATCH:
        raise _bad("training.batch_size", f"must be in [1, {MAX_BATCH}], got {batch}", actual=batch)
    accumulation = request.gradient_accumulation_steps or 1
    if not 1 <= accumulation <= MAX_ACCUMULATION:
        raise _bad("training.gradient_accumulation_steps", f"must be in [1, {MAX_ACCUMULATION}], got {accumulation}")
    seq_len = request.max_seq_len or min(DEFAULT_SEQ_LEN, max_position_embeddings)
    if not MIN_SEQ_LEN <= seq_len <= max_position_embeddings:
        raise _bad("training.max_seq_len", f"must be in [{MIN_SEQ_LEN}, {max_position_embeddings}] (the base "
                   f"model's context), got {seq_len}", actual=seq_len)
    if not 0 <= request.seed <= MAX_SEED:
        raise _bad("training.seed", f"must be in [0, {MAX_SEED}], got {request.seed}")
    fraction = _finite("training.eval_fraction", request.eval_fraction)
    if not 0 <= fraction <= MAX_EVAL_FRACTION:
        raise _bad("training.eval_fraction", f"must be in [0, {MAX_EVAL_FRACTION}], got {fraction}", actual=fraction)
    return TrainingSettings(None if max_steps is not None else float(epochs), max_steps, float(lr), schedule,
                            request.warmup_steps, batch, accumulation, seq_len, request.seed, float(fraction),
                            request.checkpoint_every_steps)


def plan_schedule(training: TrainingSettings, num_examples: int, longest_example: int) -> Schedule:
    """The step schedule for a dataset; InvalidArgument when the dataset cannot fill it."""
    if longest_example > training.max_seq_len:
        raise _bad("training.max_seq_len", f"is {training.max_seq_len} but the dataset's longest example has "
                   f"{longest_example} tokens; raise it or upload shorter examples", actual=training.max_seq_len)
    num_eval = max(1, round(num_examples * training.eval_fraction)) if training.eval_fraction > 0 else 0
    num_train = num_examples - num_eval
    if num_train < 1:
        raise _bad("training.eval_fraction", f"leaves no training example (the dataset has {num_examples})")
    micro_batches = math.ceil(num_train / training.batch_size)
    steps_per_epoch = math.ceil(micro_batches / training.gradient_accumulation_steps)
    if training.max_steps is not None:
        total = training.max_steps
    else:
        total = max(1, math.ceil(training.epochs * steps_per_epoch))
    if total > MAX_STEPS:
        raise _bad("training.epochs", f"make {total} optimizer steps, above the limit of {MAX_STEPS}")
    if training.warmup_steps >= total:
        raise _bad("training.warmup_steps", f"({training.warmup_steps}) must be less than the job's {total} "
                   "optimizer steps", actual=training.warmup_steps)
    every = training.checkpoint_every_steps or steps_per_epoch
    if every > MAX_STEPS:
        raise _bad("training.checkpoint_every_steps", f"must be at most {MAX_STEPS}, got {every}")
    return Schedule(num_train, num_eval, steps_per_epoch, total, every)


def check_names(output_adapter_name: str, deployment_name: str) -> None:
    if not ADAPTER_NAME.fullmatch(output_adapter_name):
        raise InvalidArgument(f"output_adapter_name {output_adapter_name!r:.80} must be 1-63 characters of "
                              "[A-Za-z0-9._-]", reason="BAD_NAME", field="output_adapter_name")
    if deployment_name and not DEPLOYMENT_NAME.fullmatch(deployment_name):
        raise InvalidArgument(f"deployment_name {deployment_name!r:.80} must be 1-128 characters of [A-Za-z0-9._:-] "
                              "starting with a letter or digit", reason="BAD_NAME", field="deployment_name")
