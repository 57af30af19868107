"""`loraplex up` registers the base model its node serves, so a tenant can use it at once.

Before, a fresh `make up` served `base-llm` on the node while the Registry had no such base
model: every request for it was "model not found" and no job could train for it, though the
README presents `make up` as the stack ready for tenants.
"""

from __future__ import annotations

import shutil

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.pb.loraplex.router.v1 import router_pb2 as rtpb
from services.common.pb.loraplex.router.v1 import router_pb2_grpc
from services.common.stack_base_model import RegistrationFailed, register_base_model
from services.registry.config import RegistryConfig
from tests.common.test_stack import NAMES, read_until, start_up
from tests.conftest import free_port, stop_process
from tests.registry.backends import InProcessRegistry

TOKEN = "up-admin-token"


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture
def registry(tmp_path):
    server = InProcessRegistry(RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path / "registry",
                                              admin_token=TOKEN)).start()
    yield server
    server.stop()


def test_registration_is_idempotent_and_a_different_folder_under_the_name_is_refused(registry, tiny_model_dir,
                                                                                     tmp_path):
    location = register_base_model(registry.address, TOKEN, "base-llm", tiny_model_dir)
    assert location == str(tiny_model_dir.resolve())
    # A restart of the same stack registers the same folder again: no error, one row.
    assert register_base_model(registry.address, TOKEN, "base-llm", tiny_model_dir) == location
    models = registry.stub.ListBaseModels(rpb.ListBaseModelsRequest(), metadata=bearer(TOKEN)).base_models
    assert [(model.name, model.location) for model in models] == [("base-llm", location)]

    other = tmp_path / "other-checkpoint"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(RegistrationFailed, match="ALREADY_EXISTS.*--base-model-name or --data-dir"):
        register_base_model(registry.address, TOKEN, "base-llm", other)
    with pytest.raises(RegistrationFailed, match="base model 'base-llm'"):
        register_base_model(registry.address, "wrong-token", "base-llm", tiny_model_dir)


def test_up_serves_its_base_model_to_a_new_tenant(tmp_path):
    ports = {name: free_port() for name in NAMES}
    process = start_up(tmp_path, ports)
    try:
        output = read_until(process, "Ctrl-C stops everything")
        token = (tmp_path / "state" / "admin_token").read_text().strip()
        with grpc.insecure_channel(f"127.0.0.1:{ports['registry']}") as registry_channel, \
                grpc.insecure_channel(f"127.0.0.1:{ports['router']}") as router_channel:
            registry = registry_pb2_grpc.RegistryStub(registry_channel)
            tenant = registry.CreateTenant(rpb.CreateTenantRequest(name="customer-d"), metadata=bearer(token))
            key = registry.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="backend"),
                                        metadata=bearer(token)).secret
            router = router_pb2_grpc.RouterStub(router_channel)
            names = [model.name for model in router.ListModels(rtpb.ListModelsRequest(), metadata=bearer(key),
                                                               timeout=30).models]
        assert names == ["base-llm"]
        tiny = (tmp_path / "state" / "models" / "tiny").resolve()
        assert f"base model 'base-llm' is registered in the Registry ({tiny})" in output
    finally:
        assert stop_process(process, timeout=30) == 0
