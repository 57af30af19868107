"""One tenant key cannot fill the trainer's spool disk by opening many dataset uploads at
once: past its few slots an upload waits (having written nothing), other tenants' uploads go
on, and every waiting upload completes once a slot frees."""

from __future__ import annotations

import threading

from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from tests.registry.client import bearer
from tests.trainer.harness import finance_chat_lines, wait_until

SLOTS = 1


def _held_upload(trainer, tenant, name: str, release: threading.Event):
    """A dataset upload that sends its header, then waits for `release` before its bytes."""
    body = ("\n".join(finance_chat_lines()) + "\n").encode()

    def messages():
        yield pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(name=name, base_model="tiny"))
        release.wait(120)
        yield pb.UploadDatasetRequest(chunk=body)

    return trainer.stub.UploadDataset.future(messages(), metadata=bearer(tenant.key), timeout=120)


def test_a_tenants_dataset_uploads_past_its_slots_wait_without_spooling(trainer, new_tenant):
    datasets = trainer.app.servicer.domain.datasets
    slots = getattr(datasets, "upload_slots", None)
    if slots is not None:
        slots.per_tenant = SLOTS
    spool = trainer.config.data_dir / "spool"
    spooled = lambda: sum(1 for _ in spool.iterdir()) if spool.exists() else 0  # noqa: E731
    greedy, other = new_tenant("greedy"), new_tenant("other")
    release = threading.Event()
    pending = [_held_upload(trainer, greedy, f"d{i}", release) for i in range(SLOTS + 1)]
    try:
        wait_until(lambda: spooled() > SLOTS or (slots is not None and slots.users(greedy.id) == SLOTS + 1), 60)
        assert spooled() == SLOTS
        assert other.trainer.upload(finance_chat_lines()).num_examples == 12  # another tenant is not held up
    finally:
        release.set()
    assert sorted(call.result().name for call in pending) == ["d0", "d1"]
    assert spooled() == 0 and slots.users(greedy.id) == 0
