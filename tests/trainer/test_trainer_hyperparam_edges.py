"""Hyperparameters at their edges, as a client sends them: float fields mean the decimal the
caller wrote (they travel as float32), a run that diverges fails at the step it happened
instead of publishing a dead adapter, and the same job gives the same adapter bytes whichever
trainer process trains it."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.trainer.hyperparams import LoraRequest, TrainingRequest, plan_schedule, resolve_lora, resolve_training
from services.trainer.worker.protocol import WorkerSpec
from tests.conftest import REPO_ROOT
from tests.trainer.harness import finance_chat_lines


def test_fractional_epochs_make_the_steps_the_caller_asked_for(tenant):
    dataset = tenant.trainer.upload(finance_chat_lines()[:10])
    # 10 examples, batches of 1: 10 steps per epoch. As float32, 1.1 is 1.100000023841858,
    # which rounded up to 12 steps; 0.3 made 4.
    for epochs, steps in ((1.1, 11), (0.3, 3), (2.2, 22)):
        job = tenant.trainer.start(dataset.id, name="epochs", max_steps=None, epochs=epochs, batch_size=1)
        assert job.progress.total_steps == steps, (epochs, job.progress.total_steps)
        tenant.trainer.call("CancelJob", pb.CancelJobRequest(id=job.id))


def test_a_diverging_run_fails_at_its_first_bad_step_and_publishes_nothing(tenant, registry_admin):
    dataset = tenant.trainer.upload(finance_chat_lines())
    # An alpha this large overflows the gradient norm at the first step: clipping an infinite
    # norm used to zero every gradient, and the job "succeeded" with an adapter that does nothing.
    job = tenant.trainer.wait(tenant.trainer.start(dataset.id, name="diverged", max_steps=6,
                                                   lora=pb.LoraConfig(r=8, alpha=3e38)).id)
    assert job.state == pb.JOB_STATE_FAILED
    assert "training diverged at step 1 of 6" in job.error and "lora.alpha" in job.error, job.error
    assert "Traceback" not in job.error and not job.adapter_id
    adapters = registry_admin.ListAdapters(rpb.ListAdaptersRequest(tenant=tenant.id))
    assert list(adapters.adapters) == []


def run_worker(spec: WorkerSpec, folder, hash_seed: str) -> bytes:
    spec = dataclasses.replace(spec, checkpoint_dir=str(folder / "checkpoints"), output_dir=str(folder / "output"))
    folder.mkdir()
    spec.write(folder / "spec.json")
    result = subprocess.run([sys.executable, "-m", "services.trainer.worker", str(folder / "spec.json")],
                            cwd=REPO_ROOT, capture_output=True, timeout=300, stdin=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONHASHSEED": hash_seed})
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    return (folder / "output" / "adapter_config.json").read_bytes()


def test_the_same_job_writes_the_same_adapter_config_in_any_process(tiny_model_dir, tmp_path):
    dataset = tmp_path / "data.jsonl"
    dataset.write_text("\n".join(finance_chat_lines()) + "\n")
    lora = dataclasses.asdict(resolve_lora(LoraRequest(r=2), 256))
    lora["target_modules"] = list(lora["target_modules"])
    training = resolve_training(TrainingRequest(max_steps=1, learning_rate=1e-2), 512)
    schedule = plan_schedule(training, 12, 100)
    spec = WorkerSpec(job_id="job_same", base_model_name="tiny", base_model_path=str(tiny_model_dir),
                      dataset_path=str(dataset), dataset_format="chat", lora=lora,
                      training=dataclasses.asdict(training), num_eval=0, total_steps=schedule.total_steps,
                      steps_per_epoch=schedule.steps_per_epoch, checkpoint_every=schedule.checkpoint_every,
                      checkpoint_dir="", output_dir="", device="cpu", dtype="auto", torch_threads=1,
                      keep_checkpoints=1)
    # peft holds target_modules in a set: its order followed the process's string hashing, so
    # the Registry, which identifies an upload by its weights and config, saw two adapters.
    first, second = (run_worker(spec, tmp_path / seed, seed) for seed in ("1", "2"))
    assert first == second
    assert json.loads(first)["target_modules"] == sorted(lora["target_modules"])
