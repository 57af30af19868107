"""One tenant key cannot fill the registry's spool disk by opening many uploads at once:
past its few slots an upload waits (having written nothing), other tenants' uploads go on,
and every waiting upload completes once a slot frees."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from tests.registry.client import CHUNK, bearer
from tests.registry.conftest import LiveRegistry, start_registry
from tests.router.harness import wait_until

SLOTS = 2


@pytest.fixture(scope="module")
def registry(request, tmp_path_factory, tiny_model_dir) -> Iterator[LiveRegistry]:
    server = start_registry("sqlite-local", tmp_path_factory.mktemp("registry"), request, tiny_model_dir)
    yield server
    server.stop()


def _held_upload(tenant, files, name: str, release: threading.Event):
    """An upload that sends its header, then waits for `release` before its bytes."""
    data = files.zip()

    def messages():
        yield pb.UploadAdapterRequest(header=pb.UploadAdapterHeader(name=name, base_model="tiny",
                                                                    archive=pb.ADAPTER_ARCHIVE_ZIP))
        release.wait(120)
        for start in range(0, len(data), CHUNK):
            yield pb.UploadAdapterRequest(chunk=data[start:start + CHUNK])

    return tenant.stub.UploadAdapter.future(messages(), metadata=bearer(tenant.token), timeout=120)


def test_a_tenants_uploads_past_its_slots_wait_without_spooling_and_others_are_not_held_up(registry, peft_adapter):
    slots = getattr(registry.app.servicer, "upload_slots", None)
    if slots is not None:
        slots.per_tenant = SLOTS
    greedy, other = registry.new_tenant("greedy"), registry.new_tenant("other")
    release = threading.Event()
    pending = [_held_upload(greedy, peft_adapter, f"a{i}", release) for i in range(SLOTS + 1)]
    try:
        # Every upload has been read up to its header: holding a slot, or waiting for one. A
        # holder counts as a user before its spool file exists (it is created off the event
        # loop), so wait for the holders' files too: only a waiter without one ends the wait.
        wait_until(lambda: registry.counts()["spool"] > SLOTS
                   or (slots is not None and slots.users(greedy.tenant_id) == SLOTS + 1
                       and registry.counts()["spool"] == SLOTS), 60,
                   "the uploads never reached the registry")
        assert registry.counts()["spool"] == SLOTS
        assert other.upload(peft_adapter, name="b").created  # another tenant's upload is not held up
    finally:
        release.set()
    assert sorted(call.result().adapter.name for call in pending) == ["a0", "a1", "a2"]
    assert registry.counts()["spool"] == 0 and slots.users(greedy.tenant_id) == 0
