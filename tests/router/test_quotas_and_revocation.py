"""Tenant quotas end to end (gRPC RESOURCE_EXHAUSTED with RetryInfo, HTTP 429 with
Retry-After), and the change feed at work: a revoked key stops working within seconds, and
binding or unbinding a name is seen without waiting for any cache to expire."""

from __future__ import annotations

import grpc
import openai
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from openai import OpenAI

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from tests.registry.client import expect_error, unique
from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.harness import bearer, wait_until


def retry_delay(error: grpc.RpcError) -> float:
    for detail in rpc_status.from_call(error).details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            detail.Unpack(info)
            return info.retry_delay.ToNanoseconds() / 1e9
    raise AssertionError("no RetryInfo")


def test_concurrent_request_quota(make_router, world, nodes):
    router = make_router([n.address for n in nodes], tenant_quota=[f"{world.a.tenant_name}:1:0"])
    router.wait_healthy(2)
    stream = router.stub.Generate(pb.GenerateRequest(
        model=CUSTOMER_A_MODEL, prompt="go on", sampling=gen.SamplingParams(max_tokens=480, ignore_eos=True)),
        metadata=bearer(world.a.token), timeout=120)
    next(stream)
    request = pb.GenerateRequest(model="tiny", prompt="hi", sampling=gen.SamplingParams(max_tokens=2))
    error = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, router.stub.Complete, request,
                         metadata=bearer(world.a.token), timeout=30)
    assert "in flight" in error.details() and retry_delay(error) > 0
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert caught.value.code == "rate_limit_exceeded" and int(caught.value.response.headers["retry-after"]) >= 1
    # Another tenant is not affected; and the slot comes back once the stream ends.
    assert router.stub.Complete(request, metadata=bearer(world.b.token), timeout=60).usage.completion_tokens == 2
    stream.cancel()
    wait_until(lambda: router.run(lambda: router.app.core.quotas.in_flight(world.a.tenant_id)) == 0,
               what="the cancelled stream gives its slot back")
    assert router.stub.Complete(request, metadata=bearer(world.a.token), timeout=60).usage.completion_tokens == 2


def test_tokens_per_minute_quota(make_router, world, nodes):
    router = make_router([n.address for n in nodes], tenant_quota=[f"{world.b.tenant_id}:0:30"])
    router.wait_healthy(2)
    request = pb.GenerateRequest(model="customerB-model", prompt="hello there",
                                 sampling=gen.SamplingParams(max_tokens=40, ignore_eos=True))
    assert router.stub.Complete(request, metadata=bearer(world.b.token), timeout=60).usage.completion_tokens == 40
    error = expect_error(grpc.StatusCode.RESOURCE_EXHAUSTED, router.stub.Complete, request,
                         metadata=bearer(world.b.token), timeout=30)
    assert "30 tokens per minute" in error.details()
    assert retry_delay(error) > 2  # 10+ tokens over at 0.5 tokens per second
    with pytest.raises(openai.RateLimitError) as caught:
        OpenAI(base_url=router.base_url, api_key=world.b.token, max_retries=0).chat.completions.create(
            model="customerB-model", messages=[{"role": "user", "content": "hi"}])
    assert float(caught.value.response.headers["retry-after-ms"]) > 2000
    # Tenant A has no such limit on this router.
    router.stub.Complete(pb.GenerateRequest(model="tiny", prompt="hi", sampling=gen.SamplingParams(max_tokens=40)),
                         metadata=bearer(world.a.token), timeout=60)


def test_a_revoked_key_is_refused_within_seconds(router, world):
    key_id, secret = world.new_key(world.a)
    listing = pb.ListModelsRequest()
    assert router.stub.ListModels(listing, metadata=bearer(secret), timeout=30).models  # verified and cached
    client = OpenAI(base_url=router.base_url, api_key=secret, max_retries=0)
    assert client.models.list().data
    world.admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=key_id))

    def refused() -> bool:
        try:
            router.stub.ListModels(listing, metadata=bearer(secret), timeout=30)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            return True
        return False

    # The router caches keys for 600s in these tests: only the change feed can do this.
    wait_until(refused, timeout=10, what="revoked key refused")
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_binding_and_unbinding_names_is_seen_through_the_feed(router, world):
    name = unique("fresh-model")
    request = pb.GenerateRequest(model=name, prompt="hi", sampling=gen.SamplingParams(max_tokens=2))
    expect_error(grpc.StatusCode.NOT_FOUND, router.stub.Complete, request, metadata=bearer(world.a.token),
                 timeout=30)  # cached as unknown
    world.a.BindDeployment(rpb.BindDeploymentRequest(name=name, adapter_name="legal"))

    def served() -> bool:
        try:
            return router.stub.Complete(request, metadata=bearer(world.a.token), timeout=60).adapter_id != ""
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.NOT_FOUND
            return False

    wait_until(served, timeout=10, what="the new name resolves")
    assert name in {m.name for m in router.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(world.a.token),
                                                           timeout=30).models}
    world.a.UnbindDeployment(rpb.UnbindDeploymentRequest(name=name))
    wait_until(lambda: not served(), timeout=10, what="the unbound name is gone")


def test_the_feed_reconnects_after_a_registry_restart_and_keeps_working(make_router, tiny_model_dir, tmp_path):
    from services.registry.config import RegistryConfig
    from tests.conftest import free_port
    from tests.registry.backends import InProcessRegistry
    from tests.registry.client import Client
    from tests.router.harness import ADMIN_TOKEN

    config = RegistryConfig(port=free_port(), metrics_port=0, data_dir=tmp_path / "registry", admin_token=ADMIN_TOKEN,
                            watch_poll_seconds=0.2)
    registry = InProcessRegistry(config).start()
    admin = Client(registry.stub, ADMIN_TOKEN)
    tenant = admin.CreateTenant(rpb.CreateTenantRequest(name=unique("restart")))
    first = admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="one"))
    second = admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="two"))
    router = make_router([], registry_address=registry.address)
    for key in (first, second):
        router.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(key.secret), timeout=30)
    cursor = router.run(lambda: router.app.watcher.cursor)
    registry.stop()
    try:
        wait_until(lambda: not router.run(lambda: router.app.watcher.state.live), what="the feed notices")
        # No feed, no trusted cache: the router asks the (absent) registry rather than guess.
        expect_error(grpc.StatusCode.UNAVAILABLE, router.stub.ListModels, pb.ListModelsRequest(),
                     metadata=bearer(first.secret), timeout=30)
        registry = InProcessRegistry(config).start()  # same port, same database
        admin = Client(registry.stub, ADMIN_TOKEN)
        wait_until(lambda: router.run(lambda: router.app.watcher.connects) == 2, what="the feed reconnects")
        assert router.run(lambda: router.app.watcher.cursor) >= cursor  # resumed, not restarted
        router.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(second.secret), timeout=30)
        admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=second.key.id))
        wait_until(lambda: _refused(router, second.secret), timeout=10, what="revocation after the restart")
        router.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(first.secret), timeout=30)
    finally:
        registry.stop()


def _refused(router, secret: str) -> bool:
    try:
        router.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(secret), timeout=30)
    except grpc.RpcError as error:
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        return True
    return False
