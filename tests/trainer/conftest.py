"""Trainer fixtures: a real Registry (in-process, SQLite + local blobs) with the tiny base
model registered, a real trainer on a free port, and tenants with API keys."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator

import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.registry.config import RegistryConfig
from tests.registry.backends import InProcessRegistry
from tests.registry.client import Client
from tests.trainer.harness import InProcessTrainer, TrainerClient, trainer_config

ADMIN_TOKEN = "trainer-test-admin"


@dataclasses.dataclass
class Tenant:
    id: str
    name: str
    key: str
    trainer: TrainerClient


@pytest.fixture(scope="session")
def registry(tmp_path_factory, tiny_model_dir) -> Iterator[InProcessRegistry]:
    config = RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path_factory.mktemp("registry"),
                            admin_token=ADMIN_TOKEN)
    server = InProcessRegistry(config).start()
    Client(server.stub, ADMIN_TOKEN).RegisterBaseModel(rpb.RegisterBaseModelRequest(name="tiny",
                                                                                    location=str(tiny_model_dir)))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def registry_admin(registry) -> Client:
    return Client(registry.stub, ADMIN_TOKEN)


@pytest.fixture(scope="module")
def trainer(registry, tmp_path_factory) -> Iterator[InProcessTrainer]:
    server = InProcessTrainer(trainer_config(tmp_path_factory.mktemp("trainer"), registry.address,
                                             ADMIN_TOKEN)).start()
    yield server
    server.stop()


@pytest.fixture
def new_tenant(registry_admin, trainer):
    def make(prefix: str = "t") -> Tenant:
        tenant = registry_admin.CreateTenant(rpb.CreateTenantRequest(name=f"{prefix}-{uuid.uuid4().hex[:10]}"))
        key = registry_admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="test"))
        return Tenant(tenant.id, tenant.name, key.secret, trainer.client(key.secret))

    return make


@pytest.fixture
def tenant(new_tenant) -> Tenant:
    return new_tenant()


@pytest.fixture
def admin(trainer) -> TrainerClient:
    return trainer.client(ADMIN_TOKEN)
