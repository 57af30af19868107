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
from tests.registry.backends import InProcessRegistry
from tests.trainer.conftest import ADMIN_TOKEN
from tests.trainer.harness import (InProcessTrainer, TrainerClient, finance_chat_lines, queued_behind_a_blocker,
                                   registry_with_tenant, trainer_config, wait_until, worker_pids)

STEPS, EVERY = 120, 10


def resumed_from(data_dir: Path, job_id: str) -> list[int]:
    """Steps the job's worker resumed from, as its log (kept after the job ends) records them."""
    text = (data_dir / "jobs" / job_id / "worker.log").read_text()
    return [int(step) for step in re.findall(r"resuming from the checkpoint at step (\d+)", text)]


def start_trainer_process(data_dir: Path, registry_address: str, log: Path, *flags: str):
    """A trainer process; `flags` come last, so they override the defaults here."""
    port = free_port()
    process = start_module("services.trainer", "--port", str(port), "--metrics-port", "0", "--data-dir",
                           str(data_dir), "--registry-address", registry_address, "--admin-token", ADMIN_TOKEN,
                           "--torch-threads", "1", "--auth-cache-seconds", "0", *flags, log=log)
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


def test_cancelling_a_job_the_shutdown_put_back_in_the_queue_removes_its_files(new_tenant, registry, tmp_path):
    # Its checkpoints and its copy of the dataset stayed on disk for good (and outlived a
    # DeleteDataset of that dataset): only a job that ended while running was cleaned up.
    config = trainer_config(tmp_path / "trainer", registry.address, ADMIN_TOKEN)
    resumable, blocking = new_tenant("resumable"), new_tenant("blocking")
    first = InProcessTrainer(config).start()
    client = first.client(resumable.key)
    job = client.start(client.upload(finance_chat_lines()).id, name="requeued", max_steps=STEPS,
                       checkpoint_every_steps=10 * STEPS)
    client.wait_for(job.id, lambda current: current.progress.step >= 2)
    blocker_client = first.client(blocking.key)
    blocker = blocker_client.start(blocker_client.upload(finance_chat_lines()).id, name="blocker", max_steps=100_000)
    first.stop()  # the job checkpoints and goes back to the queue

    second = InProcessTrainer(config).start()
    try:
        # The blocker's tenant has had no turn yet, so it takes the one device and the job waits.
        blocker_client, client = second.client(blocking.key), second.client(resumable.key)
        blocker_client.wait_for(blocker.id, lambda current: current.state == pb.JOB_STATE_RUNNING)
        folder = config.data_dir / "jobs" / job.id
        assert (folder / "checkpoints").is_dir() and (folder / "dataset.jsonl").is_file()
        cancelled = client.call("CancelJob", pb.CancelJobRequest(id=job.id))
        assert cancelled.state == pb.JOB_STATE_CANCELLED
        assert sorted(entry.name for entry in folder.iterdir()) == ["worker.log"]
        blocker_client.call("CancelJob", pb.CancelJobRequest(id=blocker.id))
    finally:
        second.stop()


def test_a_crash_while_publishing_keeps_the_figures_of_the_finished_run(tiny_model_dir, tmp_path, processes):
    # The last figures of a run were only in memory until the job ended: a crash while its
    # adapter waited for the Registry left the job, once published, SUCCEEDED at step 0 with no loss.
    registry, key = registry_with_tenant(tmp_path / "registry", tiny_model_dir, "crash-while-publishing", ADMIN_TOKEN)
    data_dir = tmp_path / "trainer"
    # A long enough wait that the job waits to publish with the Registry down.
    first, channel = start_trainer_process(data_dir, registry.address, tmp_path / "first.log",
                                           "--outage-wait-seconds", "600")
    processes.append(first)
    stub = trainer_pb2_grpc.TrainerStub(channel)
    blocker, job = queued_behind_a_blocker(TrainerClient(stub, key), name="published-after-crash", max_steps=3)
    registry.stop()
    operator = TrainerClient(stub, ADMIN_TOKEN)  # no tenant key can be verified now
    operator.call("CancelJob", pb.CancelJobRequest(id=blocker.id))  # the job trains, then waits to publish
    operator.wait_for(job.id, lambda current: "uploading the adapter" in current.waiting_for)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    channel.close()

    registry = InProcessRegistry(registry.config).start()  # same port, database and blobs
    try:
        second, channel = start_trainer_process(data_dir, registry.address, tmp_path / "second.log")
        processes.append(second)
        done = TrainerClient(trainer_pb2_grpc.TrainerStub(channel), key).wait(job.id)
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        assert (done.progress.step, done.progress.total_steps, done.progress.epoch) == (3, 3, 1.0)
        assert done.progress.HasField("loss")
        channel.close()
        assert stop_process(second) == 0
    finally:
        registry.stop()
