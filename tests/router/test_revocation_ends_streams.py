"""Revoking an API key, or deleting its tenant, ends the requests that key has in flight, not
only the next ones: a gRPC stream ends with UNAUTHENTICATED, an OpenAI stream with an error
event, a non-streaming HTTP request with a 401, and the node call is cancelled (the node stops
generating). Unbinding the name a stream resolved lets that stream finish (open_streams.py
says why). The node holds each stream open after two tokens, as a long generation does."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
from openai import OpenAI

from services.common.errors import Unauthenticated
from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from services.router.auth import Caller
from services.router.open_streams import OpenStreams
from tests.registry.backends import CuttableProxy
from tests.registry.client import unique
from tests.router.harness import bearer, wait_until

GO_ON = pb.GenerateRequest(model="tiny", prompt="go on")


def texts(call, count: int) -> list[str]:
    return [next(call).delta.text for _ in range(count)]


def assert_all_released(router, node, tenant_id: str, cancelled: int = 1) -> None:
    """The node call was cancelled, and the router holds nothing for the request any more."""
    wait_until(lambda: router.run(lambda: node.cancelled) == cancelled, what="the node call is cancelled")
    wait_until(lambda: router.run(lambda: len(router.app.core.open_streams)) == 0, what="the stream is forgotten")
    assert router.run(lambda: router.app.core.quotas.in_flight(tenant_id)) == 0
    assert router.run(lambda: router.app.membership.nodes[node.address].in_flight) == 0


def test_revoking_a_key_ends_its_open_grpc_stream_and_cancels_the_node_call(held_node, world):
    router, node = held_node()
    key_id, secret = world.new_key(world.a)
    _, other_secret = world.new_key(world.a)
    call = router.stub.Generate(GO_ON, metadata=bearer(secret), timeout=30)
    other = router.stub.Generate(GO_ON, metadata=bearer(other_secret), timeout=30)  # same tenant, another key
    assert texts(call, 2) == texts(other, 2) == ["t0", "t1"]
    world.admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=key_id))
    with pytest.raises(grpc.RpcError) as caught:
        next(call)  # it used to run on until the node finished (here: never)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"API key {key_id} was revoked while this request was in progress" in caught.value.details()
    wait_until(lambda: router.run(lambda: node.cancelled) == 1, what="the node call is cancelled")
    node.finish()
    assert [response.delta.text for response in other] == ["t2"]  # the other key's stream is untouched
    assert_all_released(router, node, world.a.tenant_id)


def test_revoking_a_key_ends_its_open_http_stream_with_an_error_event(held_node, world):
    router, node = held_node()
    key_id, secret = world.new_key(world.a)
    client = OpenAI(base_url=router.base_url, api_key=secret, max_retries=0, timeout=30)
    chunks = iter(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "go on"}],
                                                 stream=True))
    assert [next(chunks).choices[0].delta.content for _ in range(3)] == ["", "t0", "t1"]
    world.admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=key_id))
    with pytest.raises(openai.APIError) as caught:
        next(chunks)
    assert caught.value.code == "invalid_api_key" and "was revoked while this request" in caught.value.message
    assert_all_released(router, node, world.a.tenant_id)


def test_revoking_a_key_ends_its_non_streaming_http_request_with_401(held_node, world):
    router, node = held_node()
    key_id, secret = world.new_key(world.a)
    client = OpenAI(base_url=router.base_url, api_key=secret, max_retries=0, timeout=30)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(client.completions.create, model="tiny", prompt="go on")
        wait_until(lambda: router.run(lambda: node.started) == 1, what="the request runs on the node")
        world.admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=key_id))
        with pytest.raises(openai.AuthenticationError) as caught:
            answer.result()
    assert "was revoked while this request was in progress" in caught.value.message
    assert_all_released(router, node, world.a.tenant_id)


def test_a_key_revoked_while_the_feed_was_down_ends_its_stream_once_the_feed_is_back(held_node, world):
    proxy = CuttableProxy(world.registry.address)  # the router's only way to the Registry
    try:
        router, node = held_node(registry_address=proxy.endpoint)
        key_id, secret = world.new_key(world.a)
        call = router.stub.Generate(GO_ON, metadata=bearer(secret), timeout=30)
        assert texts(call, 2) == ["t0", "t1"]
        proxy.cut()
        wait_until(lambda: not router.run(lambda: router.app.watcher.state.live), what="the feed is lost")
        world.admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=key_id))  # the router cannot hear of it now
        proxy.resume()  # the watcher resumes after its cursor: the revocation is replayed
        with pytest.raises(grpc.RpcError) as caught:
            next(call)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert_all_released(router, node, world.a.tenant_id)
    finally:
        proxy.cut()


def test_deleting_a_tenant_ends_its_open_streams(held_node, world):
    router, node = held_node()
    tenant = world.admin.CreateTenant(rpb.CreateTenantRequest(name=unique("leaving")))
    key = world.admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="k"))
    call = router.stub.Generate(GO_ON, metadata=bearer(key.secret), timeout=30)
    assert texts(call, 1) == ["t0"]
    world.admin.DeleteTenant(rpb.DeleteTenantRequest(tenant=tenant.id, force=True))
    with pytest.raises(grpc.RpcError) as caught:
        list(call)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "while this request was in progress" in caught.value.details()
    assert_all_released(router, node, tenant.id)


def test_unbinding_the_name_of_an_open_stream_lets_it_finish(held_node, world):
    router, node = held_node()
    name = unique("rollout")
    world.a.BindDeployment(rpb.BindDeploymentRequest(name=name, adapter_name="legal"))
    call = router.stub.Generate(pb.GenerateRequest(model=name, prompt="go on"), metadata=bearer(world.a.token),
                                timeout=30)
    assert texts(call, 2) == ["t0", "t1"]

    def listed() -> bool:
        models = router.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(world.a.token), timeout=30).models
        return name in {model.name for model in models}

    assert listed()  # now cached for 600s: only the feed event can drop it
    world.a.UnbindDeployment(rpb.UnbindDeploymentRequest(name=name))
    wait_until(lambda: not listed(), what="the router applied the unbind")
    node.finish()
    assert [response.delta.text for response in call] == ["t2"]
    assert router.run(lambda: node.cancelled) == 0


def test_a_key_that_expires_mid_stream_ends_its_stream_at_its_expiry(held_node, world):
    """The Registry sends no event when a key expires: the router ends the stream at the expiry
    its verification reported, as a new request with that key would be refused from then on."""
    router, node = held_node()
    key = world.admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=world.a.tenant_id, name=unique("k"), ttl_seconds=4))
    call = router.stub.Generate(GO_ON, metadata=bearer(key.secret), timeout=60)
    assert texts(call, 2) == ["t0", "t1"]
    with pytest.raises(grpc.RpcError) as caught:
        next(call)  # the held node never sends more: only the expiry ends this
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"API key {key.key.id} expired while this request was in progress" in caught.value.details()
    assert_all_released(router, node, world.a.tenant_id)


def test_a_key_revoked_while_it_was_being_verified_ends_its_request_as_it_registers():
    """The Registry can answer "valid" just before a revocation commits, whose event then
    arrives before the request registers: the revocation is remembered, not missed."""
    streams = OpenStreams()
    revoked, kept = Caller("tnt_a", "acme", "key_1"), Caller("tnt_a", "acme", "key_2")
    streams.key_revoked("tnt_a", "key_1")  # while key_1's verification was in flight

    async def start(caller: Caller) -> str:
        in_flight = streams.add(caller)
        try:
            return await in_flight.run(lambda: asyncio.sleep(0, "placed"))
        finally:
            in_flight.close()

    with pytest.raises(Unauthenticated, match="API key key_1 was revoked"):
        asyncio.run(start(revoked))
    assert asyncio.run(start(kept)) == "placed"
    streams.tenant_deleted("tnt_b")
    with pytest.raises(Unauthenticated, match="tenant beta was deleted"):
        asyncio.run(start(Caller("tnt_b", "beta", "key_3")))
    assert len(streams) == 0
