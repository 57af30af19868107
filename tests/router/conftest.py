"""Router fixtures: one real Registry (SQLite, local blobs) with two tenants, their PEFT
adapters uploaded and bound to deployments; two real inference node processes that download
adapters from that Registry; and a Router in front of them.

Everything heavy is session-scoped and started once; tests that need their own router
settings (quotas, a node to kill) build a cheap extra router or node on top.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.registry.config import RegistryConfig
from tests.conftest import stop_process, wait_for_health
from tests.registry.backends import InProcessRegistry
from tests.registry.client import Client, unique
from tests.registry.lora_files import make_peft_adapter
from tests.router.harness import ADMIN_TOKEN, HeldNode, InProcessRouter, NodeProcess, router_config

CUSTOMER_A_MODEL = "base-llm-with-customerA-adapter"
#: deployment name -> (tenant, adapter name, seed)
DEPLOYMENTS = {
    CUSTOMER_A_MODEL: ("a", "customerA", 1),
    "customerA-legal": ("a", "legal", 2),
    "customerA-retail": ("a", "retail", 3),
    "customerA-travel": ("a", "travel", 4),
    "customerB-model": ("b", "bfin", 5),
}


@dataclasses.dataclass
class World:
    registry: InProcessRegistry
    admin: Client
    a: Client
    b: Client
    adapter_ids: dict[str, str]  # deployment name -> adapter id

    def new_key(self, tenant: Client) -> tuple[str, str]:
        """(key id, secret) of a fresh key for the tenant."""
        reply = self.admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=tenant.tenant_id, name=unique("k")))
        return reply.key.id, reply.secret

    def new_tenant(self, prefix: str) -> Client:
        """A tenant of its own (no deployments: it uses the base model), for state no other test touched."""
        return _tenant(self.admin, self.registry, prefix)


def _tenant(admin: Client, registry: InProcessRegistry, prefix: str) -> Client:
    tenant = admin.CreateTenant(pb.CreateTenantRequest(name=unique(prefix)))
    key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=tenant.id, name="test"))
    return Client(registry.stub, key.secret, tenant.id, tenant.name)


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_model_dir) -> Iterator[World]:
    config = RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path_factory.mktemp("router-registry"),
                            admin_token=ADMIN_TOKEN, watch_poll_seconds=0.2)
    registry = InProcessRegistry(config).start()
    admin = Client(registry.stub, ADMIN_TOKEN)
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", location=str(tiny_model_dir)))
    tenants = {"a": _tenant(admin, registry, "customer-a"), "b": _tenant(admin, registry, "customer-b")}
    peft_root = tmp_path_factory.mktemp("router-peft")
    adapter_ids = {}
    for name, (owner, adapter, seed) in DEPLOYMENTS.items():
        files = make_peft_adapter(tiny_model_dir, peft_root / adapter, r=4, alpha=16, seed=seed)
        uploaded = tenants[owner].upload(files, name=adapter, as_files=True)
        tenants[owner].BindDeployment(pb.BindDeploymentRequest(name=name, adapter_name=adapter))
        adapter_ids[name] = uploaded.adapter.id
    yield World(registry, admin, tenants["a"], tenants["b"], adapter_ids)
    registry.stop()


def start_nodes(count: int, world: World, model_dir: Path, logs: Path) -> list[NodeProcess]:
    nodes = [NodeProcess(model_dir, world.registry.address, logs / f"node-{i}.log") for i in range(count)]
    with ThreadPoolExecutor(count) as pool:  # they load torch in parallel
        list(pool.map(lambda n: wait_for_health(n.address, timeout=120, process=n.process), nodes))
    return nodes


def stop_nodes(nodes: list[NodeProcess]) -> None:
    for node in nodes:
        node.close()
        stop_process(node.process)


@pytest.fixture(scope="session")
def nodes(world, tiny_model_dir, tmp_path_factory) -> Iterator[list[NodeProcess]]:
    started = start_nodes(2, world, tiny_model_dir, tmp_path_factory.mktemp("node-logs"))
    yield started
    stop_nodes(started)


@pytest.fixture(scope="session")
def router(world, nodes) -> Iterator[InProcessRouter]:
    server = InProcessRouter(router_config([n.address for n in nodes], world.registry.address)).start()
    server.wait_feed_live()
    server.wait_healthy(len(nodes))
    yield server
    server.stop()


@pytest.fixture
def make_router(world) -> Iterator:
    """Builds extra routers with their own settings; all stopped at the end of the test."""
    started: list[InProcessRouter] = []

    def make(nodes: list[str], registry_address: str = "", **overrides) -> InProcessRouter:
        config = router_config(nodes, registry_address or world.registry.address, **overrides)
        server = InProcessRouter(config).start()
        started.append(server)
        server.wait_feed_live()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def held_node(make_router) -> Iterator:
    """Builds a router in front of one HeldNode (extra router settings as keywords); returns
    (router, node). The nodes stop at the end of the test, before their routers' loops do."""
    started: list[HeldNode] = []

    def make(**overrides) -> tuple[InProcessRouter, HeldNode]:
        node = HeldNode()
        router = make_router([node.address], **overrides)
        node.serve(router)
        started.append(node)
        router.wait_healthy(1)
        return router, node

    yield make
    for node in started:
        node.stop()
