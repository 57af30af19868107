"""Restart safety. Decision (services/trainer/queue.py): a job interrupted while running resumes
from its last checkpoint after the trainer restarts (and gives the same adapter as an
uninterrupted run); queued jobs still run; a clean shutdown checkpoints running jobs first;
a job interrupted too often is failed with the reason (test_trainer_backends.py)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import grpc

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2_grpc
from tests.conftest import free_port, start_module, stop_process, wait_for_health
from tests.trainer.conftest import ADMIN_TOKEN
from tests.trainer.harness import (InProcessTrainer, TrainerClient, finance_chat_lines, trainer_config, wait_until,
                                   worker_pids)

STEPS, EVERY = 120, 10


def resumed_from(data_dir: Path, job_id: str) -> list[int]:
    """Steps the job's worker resumed from, as its log (kept after the job ends) records them."""
    text = (data_dir / "jobs" / job_id / "worker.log").read_text()
    return [int(step) for step in re.findall(r"resuming from the checkpoint at step (\d+)", text)]


def start_trainer_process(data_dir: Path, registry_address: str, log: Path):
    port = free_port()
    process = start_module("services.trainer", "--port", str(port), "--metrics-port", "0", "--data-dir",
                           str(data_dir), "--registry-address", registry_address, "--admin-token", ADMIN_TOKEN,
                           "--torch-threads", "1", "--auth-cache-seconds", "0", log=log)
    wait_for_health(f"127.0.0.1:{port}", process=process)
    return process, grpc.insecure_channel(f"127.0.0.1:{port}")


def test_after_a_crash_the_running_job_resumes_and_queued_jobs_run(tenant, registry, registry_admin, tmp_path,
                                                                   processes):
    # The reference: the same job, uninterrupted, on the module's trainer (in parallel with the rest).
    reference = tenant.trainer.start(tenant.trainer.upload(finance_chat_lines()).id, name="uninterrupted",
                                     max_steps=STEPS, checkpoint_every_steps=EVERY, learning_rate=2e-3)
    data_dir = tmp_path / "trainer"
    first, channel = start_trainer_process(data_dir, registry.address, tmp_path / "first.log")
    processes.append(first)
    client = TrainerClient(trainer_pb2_grpc.TrainerStub(channel), tenant.key)
    dataset = client.upload(finance_chat_lines())
    interrupted = client.start(dataset.id, name="interrupted", max_steps=STEPS, checkpoint_every_steps=EVERY,
                               learning_rate=2e-3)
    waiting = client.start(dataset.id, name="waiting", max_steps=3)
    client.wait_for(interrupted.id, lambda job: job.progress.step >= 2 * EVERY)

    assert worker_pids(data_dir, interrupted.id)
    os.kill(first.pid, signal.SIGKILL)  # a crash: no shutdown code runs
    first.wait()
    channel.close()
    wait_until(lambda: worker_pids(data_dir, interrupted.id) == [])  # the orphaned worker noticed and quit

    second, channel = start_trainer_process(data_dir, registry.address, tmp_path / "second.log")
    processes.append(second)
    client = TrainerClient(trainer_pb2_grpc.TrainerStub(channel), tenant.key)
    done = client.wait(interrupted.id)
    assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
    assert done.progress.step == STEPS
    steps = resumed_from(data_dir, interrupted.id)
    assert len(steps) == 1 and steps[0] >= 2 * EVERY and steps[0] % EVERY == 0
    assert client.wait(waiting.id).state == pb.JOB_STATE_SUCCEEDED

    # Resuming is exact: the same job run without interruption gives byte-identical weights.
    reference = tenant.trainer.wait(reference.id)
    assert reference.state == pb.JOB_STATE_SUCCEEDED
    shas = [registry_admin.GetAdapter(rpb.GetAdapterRequest(id=job.adapter_id)).sha256 for job in (done, reference)]
    assert shas[0] == shas[1]
    channel.close()
    assert stop_process(second) == 0


def test_a_clean_shutdown_checkpoints_the_running_job_which_resumes_after_restart(tenant, registry, tmp_path):
    config = trainer_config(tmp_path / "trainer", registry.address, ADMIN_TOKEN)
    first = InProcessTrainer(config).start()
    client = first.client(tenant.key)
    dataset = client.upload(finance_chat_lines())
    job = client.start(dataset.id, name="shutdown", max_steps=STEPS, checkpoint_every_steps=10 * STEPS)
    client.wait_for(job.id, lambda current: current.progress.step >= 5)
    first.stop()  # SIGTERM path: the worker saves a checkpoint, the job goes back to the queue

    second = InProcessTrainer(config).start()
    try:
        client = second.client(tenant.key)
        done = client.wait(job.id)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        steps = resumed_from(config.data_dir, job.id)
        assert len(steps) == 1 and 5 <= steps[0] < STEPS
    finally:
        second.stop()
