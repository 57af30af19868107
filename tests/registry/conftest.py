"""Registry fixtures: PostgreSQL and S3 backends, a live registry per backend, tenants.

`registry` is parametrized over the four backend pairs (SQLite/PostgreSQL x local/S3) and
module-scoped: each test module runs against each pair, with one server per pair. Tests
isolate themselves by creating their own tenants (`tenant` fixture), not by restarting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.registry.config import RegistryConfig
from services.registry.context import ADAPTER_BLOB_PREFIX
from services.registry.db.models import Adapter, ChangeEvent, Deployment
from tests.registry.backends import InProcessRegistry, MotoS3, PostgresCluster
from tests.registry.client import Client, unique
from tests.registry.lora_files import AdapterFiles, make_peft_adapter

ADMIN_TOKEN = "test-admin-token"
BACKENDS = ["sqlite-local", "sqlite-s3", "postgres-local", "postgres-s3"]
DATABASES = ["sqlite-local", "postgres-local"]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory) -> Iterator[MotoS3]:
    server = MotoS3(tmp_path_factory.mktemp("moto") / "moto.log").start()
    yield server
    server.stop()


def registry_config(backend: str, data_dir: Path, request, **overrides) -> RegistryConfig:
    database, store = backend.split("-")
    settings: dict = {"port": 0, "metrics_port": 0, "data_dir": data_dir, "admin_token": ADMIN_TOKEN,
                      "watch_poll_seconds": 0.2}
    if database == "postgres":
        settings["database_url"] = request.getfixturevalue("postgres").new_database()
    if store == "s3":
        settings.update(blob_store="s3", s3_endpoint=request.getfixturevalue("moto").endpoint,
                        s3_bucket=unique("bucket"), s3_access_key="test", s3_secret_key="test")
    settings.update(overrides)
    return RegistryConfig(**settings)


class LiveRegistry(InProcessRegistry):
    """An in-process registry plus helpers to inspect its database and store directly."""

    backend = ""

    @property
    def admin(self) -> Client:
        return Client(self.stub, ADMIN_TOKEN)

    def counts(self) -> dict[str, int]:
        with self.ctx.db.read() as session:
            rows = {model.__tablename__: session.scalar(select(func.count()).select_from(model))
                    for model in (Adapter, Deployment, ChangeEvent)}
        blobs = sum(1 for _ in self.ctx.store.list(ADAPTER_BLOB_PREFIX))
        spooled = sum(1 for _ in self.ctx.spool_dir.iterdir())
        return {**rows, "blobs": blobs, "spool": spooled}

    def new_tenant(self, prefix: str = "t") -> Client:
        tenant = self.admin.CreateTenant(pb.CreateTenantRequest(name=unique(prefix)))
        key = self.admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=tenant.id, name="test"))
        return Client(self.stub, key.secret, tenant.id, tenant.name)


def start_registry(backend: str, data_dir: Path, request, tiny_model_dir: Path, **overrides) -> LiveRegistry:
    registry = LiveRegistry(registry_config(backend, data_dir, request, **overrides)).start()
    registry.backend = backend
    registry.admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", location=str(tiny_model_dir)))
    return registry


@pytest.fixture(scope="module", params=BACKENDS)
def registry(request, tmp_path_factory, tiny_model_dir) -> Iterator[LiveRegistry]:
    server = start_registry(request.param, tmp_path_factory.mktemp("registry"), request, tiny_model_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module", params=DATABASES)
def registry_sql(request, tmp_path_factory, tiny_model_dir) -> Iterator[LiveRegistry]:
    """For behaviour the blob store plays no part in: both databases, local blobs."""
    server = start_registry(request.param, tmp_path_factory.mktemp("registry"), request, tiny_model_dir)
    yield server
    server.stop()


@pytest.fixture
def tenant(registry) -> Client:
    return registry.new_tenant()


@pytest.fixture(scope="session")
def peft_adapter(tiny_model_dir, tmp_path_factory) -> AdapterFiles:
    return make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("peft") / "adapter")
