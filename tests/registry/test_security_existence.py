"""A tenant probing another tenant's ids learns nothing: every part of the error (status,
message, ErrorInfo reason and metadata) is what an id that never existed gets."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import expect_error
from tests.registry.conftest import LiveRegistry, start_registry


@pytest.fixture(scope="module")
def registry(request, tmp_path_factory, tiny_model_dir) -> Iterator[LiveRegistry]:
    server = start_registry("sqlite-local", tmp_path_factory.mktemp("registry"), request, tiny_model_dir)
    yield server
    server.stop()


def _seen(call, request) -> tuple:
    """Everything a client can read from a failed call, the probed id replaced by a placeholder."""
    error = expect_error(grpc.StatusCode.NOT_FOUND, call, request)
    probed = request.key_id if isinstance(request, pb.RevokeApiKeyRequest) else request.id
    info = error_info(error)
    metadata = {key: value.replace(probed, "ID") for key, value in info.metadata.items()}
    return error.details().replace(probed, "ID"), info.reason, info.domain, metadata


def test_another_tenants_adapter_and_key_ids_read_exactly_like_unknown_ones(registry, peft_adapter):
    alice, mallory = registry.new_tenant("alice"), registry.new_tenant("mallory")
    adapter = alice.upload(peft_adapter, name="secret").adapter
    alice_key = alice.ListApiKeys(pb.ListApiKeysRequest()).keys[0].id
    probes = [
        (mallory.GetAdapter, pb.GetAdapterRequest(id=adapter.id), pb.GetAdapterRequest(id="adp_" + "0" * 32)),
        (mallory.DeleteAdapter, pb.DeleteAdapterRequest(id=adapter.id), pb.DeleteAdapterRequest(id="adp_" + "0" * 32)),
        (mallory.DownloadAdapter, pb.DownloadAdapterRequest(id=adapter.id),
         pb.DownloadAdapterRequest(id="adp_" + "0" * 32)),
        (mallory.RevokeApiKey, pb.RevokeApiKeyRequest(key_id=alice_key),
         pb.RevokeApiKeyRequest(key_id="key_" + "0" * 32)),
    ]
    for call, theirs, unknown in probes:
        assert _seen(call, theirs) == _seen(call, unknown), type(theirs).__name__
    # ... and nothing happened to Alice's objects.
    assert alice.GetAdapter(pb.GetAdapterRequest(id=adapter.id)).id == adapter.id
    assert not alice.ListApiKeys(pb.ListApiKeysRequest()).keys[0].HasField("revoked_at")
