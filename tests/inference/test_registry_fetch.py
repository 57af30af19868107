"""Adapters fetched from a real Registry over its DownloadAdapter stream, sha256-checked:
what the node then generates equals PEFT with the same adapter."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from services.common.errors import (ADAPTER_CORRUPTED, DEPENDENCY_REASONS, REGISTRY_UNAVAILABLE, FailedPrecondition,
                                    NotFound, Unavailable)
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.inference.config import InferenceConfig
from services.inference.engine.sampling_params import SamplingParams
from services.inference.node import Node, Prompt
from services.registry.config import RegistryConfig
from tests.registry.backends import InProcessRegistry
from tests.registry.client import Client

ADMIN = "admin-token-for-tests"


@pytest.fixture
def registry(tmp_path, tiny_model_dir):
    server = InProcessRegistry(RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path / "registry",
                                              admin_token=ADMIN)).start()
    admin = Client(server.stub, ADMIN)
    admin.RegisterBaseModel(pb.RegisterBaseModelRequest(name="tiny", location=str(tiny_model_dir)))
    admin.CreateTenant(pb.CreateTenantRequest(name="acme"))
    yield server, admin
    server.stop()


def test_node_serves_an_adapter_downloaded_from_the_registry(registry, tiny_model_dir, varied_adapters):
    server, admin = registry
    folder = varied_adapters["legal"]
    config_bytes = (folder / "adapter_config.json").read_bytes()
    weights = (folder / "adapter_model.safetensors").read_bytes()
    uploaded = admin.upload_bytes(config_bytes + weights, name="legal", tenant="acme",
                                  archive=pb.ADAPTER_ARCHIVE_FILES,
                                  files=[("adapter_config.json", len(config_bytes)),
                                         ("adapter_model.safetensors", len(weights))]).adapter
    node = Node.build(InferenceConfig(base_model=tiny_model_dir, registry_address=server.address,
                                      admin_token=ADMIN, kv_cache_mb=2, adapter_pool_pages=32))
    sampling = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)

    async def run():
        node.start()
        try:
            outputs = [o async for o in node.generate(Prompt(text="the contract"), sampling, uploaded.id,
                                                      uploaded.sha256)]
            with pytest.raises(NotFound):
                [o async for o in node.generate(Prompt(text="x"), sampling, "no-such-adapter")]
            node.manager.drop_host(uploaded.id)
            with pytest.raises(FailedPrecondition, match="does not match"):
                [o async for o in node.generate(Prompt(text="x"), sampling, uploaded.id, "f" * 64)]
            return [t for o in outputs for t in o.token_ids]
        finally:
            node.close()

    tokens = asyncio.run(run())
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), folder).eval()
    ids = tokenizer.encode("the contract")
    with torch.no_grad():
        expected = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)[0, len(ids):].tolist()
    assert tokens == expected


def test_a_wrong_token_is_refused_by_the_registry(registry, tiny_model_dir):
    server, _ = registry
    node = Node.build(InferenceConfig(base_model=tiny_model_dir, registry_address=server.address,
                                      admin_token="wrong", kv_cache_mb=2, adapter_pool_pages=8))

    async def run():
        with pytest.raises(Exception) as caught:
            await node.manager.ensure_host("anything")
        return caught.value

    error = asyncio.run(run())
    assert "UNAUTHENTICATED" in str(error)
    assert not isinstance(error, grpc.RpcError), "gRPC errors become domain errors"


class CorruptingRegistry(registry_pb2_grpc.RegistryServicer):
    """Sends a manifest, then bytes that do not match it (a disk or a proxy gone bad)."""

    async def DownloadAdapter(self, request, context):
        yield pb.DownloadAdapterResponse(manifest=pb.AdapterManifest(config_json="{}", size_bytes=5, sha256="0" * 64))
        yield pb.DownloadAdapterResponse(chunk=b"12345")


@pytest.mark.parametrize("failure", ["corrupted", "unreachable"])
def test_an_adapter_its_registry_cannot_deliver_is_unavailable_blaming_the_registry(tiny_model_dir, failure):
    """Not the caller's fault (it was FAILED_PRECONDITION: a 400 telling it to change its
    request) nor the node's: UNAVAILABLE with a reason the router reads as "try a node that
    may hold the adapter, and keep this one in service"."""
    async def run():
        server = grpc.aio.server()
        registry_pb2_grpc.add_RegistryServicer_to_server(CorruptingRegistry(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        if failure == "unreachable":
            await server.stop(0)
        node = Node.build(InferenceConfig(base_model=tiny_model_dir, registry_address=f"127.0.0.1:{port}",
                                          admin_token=ADMIN, kv_cache_mb=2, adapter_pool_pages=8))
        try:
            with pytest.raises(Unavailable) as caught:
                await node.manager.ensure_host("adp_1")
            return caught.value
        finally:
            await server.stop(0)

    error = asyncio.run(run())
    assert error.reason in DEPENDENCY_REASONS
    assert error.reason == (ADAPTER_CORRUPTED if failure == "corrupted" else REGISTRY_UNAVAILABLE)
