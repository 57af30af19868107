"""A job waits out an outage of its dataset store or of the Registry (--outage-wait-seconds)
instead of failing at once: it finishes when the dependency comes back, a cancel ends the wait
at once, and a finished training run is published once the Registry is back rather than thrown
away."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from tests.registry.backends import CuttableProxy, InProcessRegistry, MotoS3
from tests.registry.client import Client
from tests.trainer.conftest import ADMIN_TOKEN
from tests.trainer.harness import (InProcessTrainer, finance_chat_lines, queued_behind_a_blocker, registry_with_tenant,
                                  s3_settings, trainer_config)


@contextlib.contextmanager
def logged(needle: str) -> Iterator[threading.Event]:
    """An event set once the trainer logs a retry whose message contains `needle`: proof that
    the job met the outage (rather than the dependency being back before it looked)."""
    seen = threading.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if needle in record.getMessage():
                seen.set()

    handler, logger = Watch(logging.WARNING), logging.getLogger("loraplex.trainer.outage")
    logger.addHandler(handler)
    try:
        yield seen
    finally:
        logger.removeHandler(handler)


@contextlib.contextmanager
def trainer_on_s3(registry, tmp_path, tenant, outage_wait_seconds: float):
    """A trainer keeping datasets in moto's S3 behind a proxy (so the store can go away and come
    back at the same endpoint), one dataset uploaded: yields (client, dataset id, proxy)."""
    moto = MotoS3(tmp_path / "moto.log").start()
    proxy = CuttableProxy(moto.endpoint)
    trainer = InProcessTrainer(trainer_config(tmp_path / "trainer", registry.address, ADMIN_TOKEN,
                                              outage_wait_seconds=outage_wait_seconds, **s3_settings(proxy.endpoint)))
    try:
        client = trainer.start().client(tenant.key)
        yield client, client.upload(finance_chat_lines()).id, proxy
    finally:
        trainer.stop()
        proxy.cut()
        moto.stop()


def start_in_outage(client, dataset_id: str, needle: str, timeout: float = 60, **job) -> pb.Job:
    """Starts a job and returns once it has met the outage (logged a retry containing `needle`)."""
    with logged(needle) as waiting:
        started = client.start(dataset_id, max_steps=2, **job)
        assert waiting.wait(timeout), "the job never met the outage"
    return started


def train_in_outage(operator, blocker: pb.Job, job: pb.Job, needle: str, timeout: float = 240) -> pb.Job:
    """Cancels the blocker so `job` trains; returns `job` once it has met the outage (logged a
    retry containing `needle`). `operator` holds the admin token: no tenant key can be verified
    while the Registry is down."""
    with logged(needle) as waiting:
        operator.call("CancelJob", pb.CancelJobRequest(id=blocker.id))
        assert waiting.wait(timeout), "the job never met the outage"
    return operator.call("GetJob", pb.GetJobRequest(id=job.id))


READING = "reading the dataset from its store failed"


def test_a_job_waits_for_its_dataset_store_to_come_back(registry, tmp_path, tenant):
    with trainer_on_s3(registry, tmp_path, tenant, outage_wait_seconds=600) as (client, dataset_id, proxy):
        proxy.cut()
        job = start_in_outage(client, dataset_id, READING)
        shown = client.call("GetJob", pb.GetJobRequest(id=job.id))
        assert shown.state == pb.JOB_STATE_RUNNING
        assert shown.waiting_for.startswith(f"job {job.id}: {READING}"), shown
        assert "retrying until" in shown.waiting_for and "last error" in shown.waiting_for
        proxy.resume()
        done = client.wait(job.id)  # failed at once before --outage-wait-seconds
        assert done.state == pb.JOB_STATE_SUCCEEDED and not done.waiting_for, done


def test_cancelling_a_job_that_waits_for_its_dataset_store_ends_the_wait(registry, tmp_path, tenant):
    with trainer_on_s3(registry, tmp_path, tenant, outage_wait_seconds=3600) as (client, dataset_id, proxy):
        proxy.cut()
        job = start_in_outage(client, dataset_id, READING)
        client.call("CancelJob", pb.CancelJobRequest(id=job.id))
        done = client.wait(job.id, timeout=120)  # not after the hour the outage budget allows
        assert done.state == pb.JOB_STATE_CANCELLED, (done.state, done.error)


def test_a_trained_adapter_is_published_once_the_registry_is_back(tmp_path, tiny_model_dir):
    registry, key = registry_with_tenant(tmp_path / "registry", tiny_model_dir, "outage-tenant", ADMIN_TOKEN)
    trainer = InProcessTrainer(trainer_config(tmp_path / "trainer", registry.address, ADMIN_TOKEN,
                                              outage_wait_seconds=600)).start()
    try:
        client = trainer.client(key)
        blocker, job = queued_behind_a_blocker(client, name="fin-outage")
        registry.stop()
        operator = trainer.client(ADMIN_TOKEN)
        shown = train_in_outage(operator, blocker, job, "uploading the adapter to the registry")
        assert "uploading the adapter to the registry failed" in shown.waiting_for, shown
        registry = InProcessRegistry(registry.config).start()  # same port, same database and blobs
        done = operator.wait(job.id)  # failed after 7 s of retries before, and the trained adapter was deleted
        assert done.state == pb.JOB_STATE_SUCCEEDED, done.error
        admin = Client(registry.stub, ADMIN_TOKEN)
        adapter = admin.GetAdapter(rpb.GetAdapterRequest(id=done.adapter_id))
        assert adapter.version == done.adapter_version
    finally:
        trainer.stop()
        registry.stop()


def test_a_job_fails_saying_so_when_its_store_stays_down(registry, tmp_path, tenant):
    with trainer_on_s3(registry, tmp_path, tenant, outage_wait_seconds=0) as (client, dataset_id, proxy):
        proxy.cut()
        done = client.wait(client.start(dataset_id, max_steps=2).id)
        assert done.state == pb.JOB_STATE_FAILED
        assert done.error.startswith("the dataset store stayed down past --outage-wait-seconds (0s)"), done.error
