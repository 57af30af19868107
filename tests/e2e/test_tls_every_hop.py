"""Every hop over mutual TLS: a Registry (in-process), a Router (in-process, gRPC + HTTPS) and a
real inference node process configured through its LORAPLEX_TLS_* variables. The node registers
with the router (node agent -> router), the router polls it and relays to it (router -> node),
resolves names and verifies keys (router -> registry), and the node downloads the adapter
(node -> registry); a tenant reaches it all with the official OpenAI SDK over HTTPS."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from openai import OpenAI

from services.common import tls
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.router.v1 import nodes_pb2
from services.registry.config import RegistryConfig
from tests.conftest import stop_process, wait_for_health
from tests.registry.backends import InProcessRegistry
from tests.registry.client import Client, bearer, unique
from tests.registry.lora_files import make_peft_adapter
from tests.router.harness import ADMIN_TOKEN, InProcessRouter, NodeProcess, router_config

DEPLOYMENT = "tls-deployment"


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tls_certs) -> Iterator[InProcessRegistry]:
    config = RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path_factory.mktemp("tls-registry"),
                            admin_token=ADMIN_TOKEN, watch_poll_seconds=0.2, **tls_certs.server(mutual=True))
    server = InProcessRegistry(config, client_tls=tls_certs.client(with_certificate=True)).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tenant(registry, tiny_model_dir, tmp_path_factory) -> Client:
    """A tenant with an API key and an adapter bound to DEPLOYMENT."""
    admin = Client(registry.stub, ADMIN_TOKEN)
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", location=str(tiny_model_dir)))
    created = admin.CreateTenant(pb.CreateTenantRequest(name=unique("tls-tenant")))
    key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=created.id, name="k"))
    tenant = Client(registry.stub, key.secret, created.id, created.name)
    files = make_peft_adapter(tiny_model_dir, tmp_path_factory.mktemp("tls-peft") / "a", r=4, alpha=16, seed=7)
    tenant.upload(files, name="tls-adapter", as_files=True)
    tenant.BindDeployment(pb.BindDeploymentRequest(name=DEPLOYMENT, adapter_name="tls-adapter"))
    return tenant


@pytest.fixture(scope="module")
def router(registry, tls_certs) -> Iterator[InProcessRouter]:
    config = router_config([], registry.address, **tls_certs.server(mutual=True), **tls_certs.client_fields())
    server = InProcessRouter(config, client_tls=tls_certs.client(with_certificate=True)).start()
    server.wait_feed_live()  # router -> registry: the change feed
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(registry, router, tls_certs, tiny_model_dir, tmp_path_factory) -> Iterator[NodeProcess]:
    env = {"LORAPLEX_TLS_CERT": str(tls_certs.server_cert), "LORAPLEX_TLS_KEY": str(tls_certs.server_key),
           "LORAPLEX_TLS_CLIENT_CA": str(tls_certs.ca), **{f"LORAPLEX_{name.upper()}": str(path)
                                                         for name, path in tls_certs.client_fields().items()}}
    mutual = tls_certs.client(with_certificate=True)
    started = NodeProcess(tiny_model_dir, registry.address, tmp_path_factory.mktemp("tls-node") / "node.log", 0,
                          "tiny", "--router-address", router.address, env=env, client_tls=mutual)
    try:
        wait_for_health(started.address, timeout=120, process=started.process, client_tls=mutual)
        router.wait_healthy(1)  # registered through its agent, then polled by the router
        yield started
    finally:
        started.close()
        stop_process(started.process)


def https_client(router: InProcessRouter, api_key: str, ca) -> OpenAI:
    http_client = openai.DefaultHttpxClient(verify=ssl.create_default_context(cafile=str(ca)))
    return OpenAI(base_url=router.base_url, api_key=api_key, max_retries=0, timeout=60, http_client=http_client)


def test_the_openai_sdk_over_https_reaches_an_adapter_on_a_tls_node(router, node, tenant, tls_certs):
    assert router.base_url.startswith("https://")
    client = https_client(router, tenant.token, tls_certs.ca)
    models = {model.id for model in client.models.list()}
    assert {"tiny", DEPLOYMENT} <= models
    completion = client.chat.completions.create(model=DEPLOYMENT, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=3, temperature=0)
    assert completion.model == DEPLOYMENT and completion.usage.completion_tokens > 0
    assert node.stats().resident_adapter_ids  # downloaded from the registry over mutual TLS
    listed = router.nodes_stub.ListNodes(nodes_pb2.ListNodesRequest(), metadata=bearer(ADMIN_TOKEN), timeout=10)
    assert [n.address for n in listed.nodes] == [node.address]


def test_clear_text_and_untrusted_certificates_are_refused(router, node, tenant, tls_certs):
    plain = OpenAI(base_url=router.base_url.replace("https://", "http://"), api_key=tenant.token, max_retries=0,
                   timeout=10)
    with pytest.raises(openai.APIConnectionError):
        plain.models.list()
    with pytest.raises(openai.APIConnectionError):  # the SDK's default roots do not know our CA
        OpenAI(base_url=router.base_url, api_key=tenant.token, max_retries=0, timeout=10).models.list()
    # gRPC in clear text, and over TLS without a client certificate (both ports require one)
    for address in (router.address, node.address):
        for client_tls in (None, tls_certs.client()):
            with tls.channel(address, client_tls) as channel, pytest.raises(grpc.RpcError) as failed:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, (address, client_tls)
