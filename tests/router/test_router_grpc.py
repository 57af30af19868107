"""The Router over gRPC against real nodes and a real Registry: streaming, Complete,
ListModels, auth, isolation, and base-model requests."""

from __future__ import annotations

import grpc
import pytest

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.registry.v1 import registry_pb2 as registry_pb
from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from services.common.rpc import error_info
from tests.registry.client import expect_error
from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.harness import bearer

CHAT = gen.ChatMessages(messages=[gen.ChatMessage(role="system", content="You are a finance assistant."),
                                  gen.ChatMessage(role="user", content="Summarize Q3.")])


def greedy(max_tokens: int = 8, **extra) -> gen.SamplingParams:
    return gen.SamplingParams(max_tokens=max_tokens, temperature=0.0, **extra)


def test_generate_streams_a_deployment_with_its_adapter(router, world):
    replies = list(router.stub.Generate(pb.GenerateRequest(model=CUSTOMER_A_MODEL, messages=CHAT,
                                                           sampling=greedy(ignore_eos=True), request_id="trace-1"),
                                        metadata=bearer(world.a.token), timeout=60))
    assert replies[0].request_id == "trace-1"
    assert replies[0].adapter_id == world.adapter_ids[CUSTOMER_A_MODEL]
    final = replies[-1].delta
    assert final.finish_reason == gen.FINISH_REASON_LENGTH
    assert sum(len(r.delta.token_ids) for r in replies) == 8 == final.usage.completion_tokens
    assert final.usage.prompt_tokens > 0


def test_complete_equals_the_joined_stream_and_the_adapter_changes_the_output(router, world):
    request = pb.GenerateRequest(model=CUSTOMER_A_MODEL, prompt="The quarterly report",
                                 sampling=greedy(12, ignore_eos=True))
    streamed = list(router.stub.Generate(request, metadata=bearer(world.a.token), timeout=60))
    done = router.stub.Complete(request, metadata=bearer(world.a.token), timeout=60)
    assert done.text == "".join(r.delta.text for r in streamed)
    assert list(done.token_ids) == [t for r in streamed for t in r.delta.token_ids]
    assert done.model == CUSTOMER_A_MODEL and done.adapter_id == world.adapter_ids[CUSTOMER_A_MODEL]
    assert done.finish_reason == gen.FINISH_REASON_LENGTH and done.usage.completion_tokens == 12
    base = router.stub.Complete(pb.GenerateRequest(model="tiny", prompt="The quarterly report",
                                                   sampling=greedy(12, ignore_eos=True)),
                                metadata=bearer(world.a.token), timeout=60)
    assert base.adapter_id == "" and list(base.token_ids) != list(done.token_ids)


def test_list_models_shows_own_deployments_and_base_models_only(router, world):
    names_a = {m.name for m in router.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(world.a.token),
                                                      timeout=30).models}
    names_b = {m.name for m in router.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(world.b.token),
                                                      timeout=30).models}
    # Every tenant sees every base model (other tests of the session may register more than "tiny").
    base_models = {m.name for m in world.admin.ListBaseModels(registry_pb.ListBaseModelsRequest()).base_models}
    assert {CUSTOMER_A_MODEL, "customerA-legal", "tiny"} <= names_a and "customerB-model" not in names_a
    assert "tiny" in base_models and names_b == {"customerB-model"} | base_models


@pytest.mark.parametrize("metadata", [None, [("authorization", "Basic abc")], bearer("lpx_not-a-key")])
def test_missing_or_invalid_keys_are_unauthenticated(router, metadata):
    error = expect_error(grpc.StatusCode.UNAUTHENTICATED, router.stub.ListModels, pb.ListModelsRequest(),
                         metadata=metadata, timeout=30)
    assert "API key" in error.details()


def test_the_admin_token_is_not_a_tenant_key(router):
    from tests.router.harness import ADMIN_TOKEN

    expect_error(grpc.StatusCode.UNAUTHENTICATED, router.stub.ListModels, pb.ListModelsRequest(),
                 metadata=bearer(ADMIN_TOKEN), timeout=30)


def test_another_tenants_model_is_not_found_like_an_unknown_name(router, world):
    foreign = expect_error(grpc.StatusCode.NOT_FOUND, router.stub.Complete,
                           pb.GenerateRequest(model=CUSTOMER_A_MODEL, prompt="hi", sampling=greedy()),
                           metadata=bearer(world.b.token), timeout=30)
    unknown = expect_error(grpc.StatusCode.NOT_FOUND, router.stub.Complete,
                           pb.GenerateRequest(model="no-such-model", prompt="hi", sampling=greedy()),
                           metadata=bearer(world.b.token), timeout=30)
    assert foreign.details() == unknown.details().replace("no-such-model", CUSTOMER_A_MODEL)
    assert error_info(foreign).reason == "MODEL_NOT_FOUND"
    expect_error(grpc.StatusCode.NOT_FOUND, router.stub.Generate,
                 pb.GenerateRequest(model=CUSTOMER_A_MODEL, prompt="hi", sampling=greedy()),
                 metadata=bearer(world.b.token), timeout=30)


def test_bad_requests_are_invalid_argument_from_router_or_node(router, world):
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, router.stub.Complete, pb.GenerateRequest(model="tiny"),
                 metadata=bearer(world.a.token), timeout=30)
    expect_error(grpc.StatusCode.INVALID_ARGUMENT, router.stub.Complete, pb.GenerateRequest(prompt="x"),
                 metadata=bearer(world.a.token), timeout=30)
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, router.stub.Complete,
                         pb.GenerateRequest(model="tiny", prompt="x", sampling=gen.SamplingParams(top_p=2.0)),
                         metadata=bearer(world.a.token), timeout=30)
    assert "top_p" in error.details()


def test_a_request_too_large_to_pass_on_to_a_node_is_invalid_not_a_full_queue_to_retry(make_router, world, nodes):
    """The router adds its own fields for the node, so a message just under the router's limit can
    be just over it on the way on; gRPC reports that as RESOURCE_EXHAUSTED, like a full queue."""
    router = make_router([n.address for n in nodes], max_message_mb=1)
    router.wait_healthy(len(nodes))
    request = pb.GenerateRequest(model=CUSTOMER_A_MODEL, prompt="x", sampling=greedy(1))
    request.prompt = "x" * (2**20 - 16 - (request.ByteSize() - 1))  # 16 bytes under the router's limit
    error = expect_error(grpc.StatusCode.INVALID_ARGUMENT, router.stub.Complete, request,
                         metadata=bearer(world.a.token), timeout=60)
    assert error_info(error).reason == "REQUEST_TOO_LARGE" and "too large" in error.details()
    assert router.run(lambda: len(router.app.membership.placeable())) == len(nodes)  # no node was blamed
