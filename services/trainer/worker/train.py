"""The training loop of one job: transformers model + peft LoRA, plain PyTorch AdamW.

A plain loop rather than transformers.Trainer: the queue needs an exact step schedule it
computed up front (hyperparams.py), a cancel check between micro-batches, resumable state
that reproduces an uninterrupted run bit for bit, and events in our own protocol.

- Loss: summed token cross-entropy over the label tokens of the whole optimizer step, divided
  by their count, so gradient accumulation gives the same update as one big batch.
- Determinism: `seed` fixes LoRA initialisation, the held-out split, every epoch's order
  (data.py) and dropout; checkpoints carry optimizer, LR schedule and RNG state. On one device
  the same job gives the same adapter, resumed or not.
- Precision: base weights in --dtype (bfloat16 on CUDA by default), LoRA weights in float32
  (peft's autocast_adapter_dtype), loss in float32. Gradients are clipped to norm 1.0.
- Divergence: a step whose loss or gradient norm is not finite fails the job before the
  optimizer applies it. Clipping an infinite norm zeroes every gradient (the adapter silently
  stops learning and the job "succeeds" with it) and a NaN one poisons the weights, which the
  Registry then refuses only after the whole run; either way the hyperparameters are at fault
  (learning rate or alpha too high), and the job says so at the step it happened.
- Checkpoint (and evaluation on the held-out split) every `checkpoint_every` steps and at the
  end; the final adapter is written with save_pretrained to OUTPUT (renamed into place when
  complete) with base_model_name_or_path set to the Registry's base model name.

Multi-GPU (not built; one device per job): the worker is an ordinary single-process script,
so a data-parallel run is a launch change, not a new distribution layer. Start it as
`torchrun --nproc-per-node N -m services.trainer.worker SPEC` (or `accelerate launch`), wrap
model, optimizer and the per-rank micro-batches with `accelerate.Accelerator().prepare(...)`
(DDP; FSDP for bases that do not fit one device), give each rank `micro_batches(step)[rank::N]`,
and let rank 0 alone emit events and write checkpoints/output. The queue would then reserve N
device slots for the job (CUDA_VISIBLE_DEVICES listing all N).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

from services.trainer.examples import IGNORE_INDEX
from services.trainer.hyperparams import LoraSettings, TrainingSettings
from services.trainer.worker import checkpoint, data
from services.trainer.worker.control import Control
from services.trainer.worker.protocol import EXIT_DONE, EXIT_STOPPED, WorkerSpec

log = logging.getLogger("loraplex.trainer.worker")
SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_GRAD_NORM = 1.0
PROGRESS_INTERVAL_S = 0.5


def _dtype(spec: WorkerSpec, device: torch.device) -> torch.dtype:
    if spec.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[spec.dtype]


def build_model(spec: WorkerSpec, lora: LoraSettings, device: torch.device):
    base = AutoModelForCausalLM.from_pretrained(spec.base_model_path, dtype=_dtype(spec, device),
                                                local_files_only=True)
    base.config.use_cache = False
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules), use_rslora=lora.use_rslora, bias="none",
                        task_type="CAUSAL_LM")
    return get_peft_model(base, config).to(device)


class Diverged(RuntimeError):
    """The loss or the gradient is no longer a finite number."""


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over label tokens. logits [b, t, vocab], labels [b, t]."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _label_count(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


class Meter:
    """Loss over the current logging window, tokens/s and ETA over this run of the worker."""

    def __init__(self, start_step: int, total_steps: int) -> None:
        self.start_step, self.total_steps = start_step, total_steps
        self.started = self.last_emit = time.monotonic()
        self.tokens, self.window = 0, []

    def add(self, loss: float, tokens: int) -> None:
        self.window.append(loss)
        self.tokens += tokens

    def due(self) -> bool:
        return time.monotonic() - self.last_emit >= PROGRESS_INTERVAL_S

    def progress(self, step: int, epoch: float, lr: float) -> dict:
        now = time.monotonic()
        elapsed, done = now - self.started, step - self.start_step
        fields = {"step": step, "total_steps": self.total_steps, "epoch": epoch, "learning_rate": lr,
                  "loss": sum(self.window) / len(self.window) if self.window else None,
                  "tokens_per_second": self.tokens / elapsed if elapsed > 0 else 0.0,
                  "eta_seconds": elapsed / done * (self.total_steps - step) if done > 0 else None}
        self.window, self.last_emit = [], now
        return fields


class Run:
    def __init__(self, spec: WorkerSpec, control: Control) -> None:
        self.spec, self.control = spec, control
        self.lora = LoraSettings(**{**spec.lora, "target_modules": tuple(spec.lora["target_modules"])})
        self.training = TrainingSettings(**spec.training)
        self.device = torch.device(spec.device)

    def prepare(self) -> None:
        spec, training = self.spec, self.training
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        tokenizer = AutoTokenizer.from_pretrained(spec.base_model_path, local_files_only=True)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        examples = data.load_encoded(Path(spec.dataset_path), spec.dataset_format, tokenizer)
        self.train_set, self.eval_set = data.split(examples, spec.num_eval, training.seed)
        self.plan = data.StepPlan(len(self.train_set), training.batch_size, training.gradient_accumulation_steps,
                                  spec.steps_per_epoch, training.seed)
        self.control.check()
        torch.manual_seed(training.seed)
        self.model = build_model(spec, self.lora, self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=training.learning_rate, weight_decay=0.0)
        self.scheduler = get_scheduler(SCHEDULER_NAMES[training.lr_schedule], self.optimizer,
                                       num_warmup_steps=training.warmup_steps, num_training_steps=spec.total_steps)

    def restore(self) -> int:
        found = checkpoint.complete(Path(self.spec.checkpoint_dir))
        if not found:
            return 0
        return checkpoint.restore(found[-1], self.model, self.optimizer, self.scheduler, self.device)

    def train_step(self, step: int) -> tuple[float, int]:
        batches = [data.collate([self.train_set[i] for i in group], self.pad_id, self.device)
                   for group in self.plan.micro_batches(step)]
        labels = sum(_label_count(batch) for batch in batches)
        loss_total, tokens = 0.0, 0
        for batch in batches:
            self.control.check()
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = token_loss_sum(logits, batch["labels"]) / max(labels, 1)
            loss.backward()
            loss_total += loss.item()
            tokens += int(batch["attention_mask"].sum())
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM))
        if not (math.isfinite(loss_total) and math.isfinite(norm)):
            raise Diverged(f"training diverged at step {step + 1} of {self.spec.total_steps}: the loss is "
                           f"{loss_total:g} and the gradient norm {norm:g}; lower training.learning_rate "
                           f"({self.training.learning_rate:g}) or lora.alpha ({self.lora.alpha:g})")
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_total, tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        total, count = 0.0, 0
        size = self.training.batch_size
        for low in range(0, len(self.eval_set), size):
            self.control.check()
            batch = data.collate(self.eval_set[low:low + size], self.pad_id, self.device)
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += token_loss_sum(logits, batch["labels"]).item()
            count += _label_count(batch)
        self.model.train()
        return total / max(count, 1)

    def save_checkpoint(self, step: int) -> None:
        checkpoint.save(Path(self.spec.checkpoint_dir), step, self.model, self.optimizer, self.scheduler,
                        self.spec.keep_checkpoints)
        self.control.emit("checkpoint", step=step)

    def save_output(self) -> None:
        output = Path(self.spec.output_dir)
        partial = output.with_name(output.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial, safe_serialization=True)
        config_path = partial / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = self.spec.base_model_name
        # peft keeps target_modules as a set and writes it in string-hash order, which differs per
        # trainer process (PYTHONHASHSEED): sorted, the same job gives the same bytes everywhere.
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
        shutil.rmtree(output, ignore_errors=True)
        os.replace(partial, output)

    def run(self) -> int:
        spec, control = self.spec, self.control
        self.prepare()
        start = saved = self.restore()
        if start:
            log.info("job %s: resuming from the checkpoint at step %d of %d", spec.job_id, start, spec.total_steps)
        control.emit("started", step=start, total_steps=spec.total_steps, resumed=start > 0,
                     epoch=self.plan.epoch_of(start))
        meter = Meter(start, spec.total_steps)
        self.model.train()
        for step in range(start, spec.total_steps):
            control.check()
            if control.stop_requested.is_set():
                if step > saved:
                    self.save_checkpoint(step)
                return EXIT_STOPPED
            meter.add(*self.train_step(step))
            done = step + 1
            boundary = done % spec.checkpoint_every == 0 or done == spec.total_steps
            if boundary or meter.due():
                control.emit("progress", **meter.progress(done, self.plan.epoch_of(done),
                                                          self.scheduler.get_last_lr()[0]))
            if boundary and self.eval_set:
                control.emit("eval", step=done, eval_loss=self.evaluate())
            if boundary and done < spec.total_steps:
                self.save_checkpoint(done)
                saved = done
        self.save_output()
        control.emit("done", step=spec.total_steps)
        return EXIT_DONE
