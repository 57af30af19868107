"""Placement and cancellation against real nodes: the second request for an adapter lands
where it is resident; a client cancel (gRPC or HTTP) frees the request's KV on the node;
nodes that register themselves through the Nodes service are used, expired and drained."""

from __future__ import annotations

import asyncio
import http.client
import json

import grpc
import pytest
from openai import OpenAI

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2
from services.common.pb.loraplex.router.v1 import nodes_pb2
from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from services.router.node_agent import NodeAgent
from services.router.nodes import NodeStats
from services.router.placement import rendezvous_weight
from tests.registry.client import expect_error
from tests.router.harness import ADMIN_TOKEN, bearer, wait_until


def finished(nodes) -> list[int]:
    return [n.stats().requests_finished for n in nodes]


def resident(node) -> set[str]:
    return set(node.stats().resident_adapter_ids)


def complete(router, token: str, model: str, max_tokens: int = 4) -> pb.CompleteResponse:
    return router.stub.Complete(pb.GenerateRequest(model=model, prompt="hello",
                                                   sampling=gen.SamplingParams(max_tokens=max_tokens)),
                                metadata=bearer(token), timeout=60)


def test_the_second_request_for_an_adapter_lands_where_it_is_resident(router, world, nodes):
    adapter = world.adapter_ids["customerA-retail"]
    assert not any(adapter in resident(n) for n in nodes)
    before = finished(nodes)
    complete(router, world.a.token, "customerA-retail")
    holder = next(i for i, n in enumerate(nodes) if adapter in resident(n))
    middle = finished(nodes)
    assert [m - b for m, b in zip(middle, before)] == [int(i == holder) for i in range(len(nodes))]
    for _ in range(3):
        complete(router, world.a.token, "customerA-retail")
    after = finished(nodes)
    assert [a - m for a, m in zip(after, middle)] == [3 * int(i == holder) for i in range(len(nodes))]
    assert [adapter in resident(n) for n in nodes] == [i == holder for i in range(len(nodes))]


def test_residency_beats_the_adapters_rendezvous_home(router, world, nodes):
    adapter = world.adapter_ids["customerA-travel"]
    away = min(nodes, key=lambda n: rendezvous_weight(adapter, n.address))  # not its home
    away.stub.LoadAdapter(inference_pb2.LoadAdapterRequest(adapter_id=adapter), metadata=away.metadata, timeout=60)
    wait_until(lambda: any(adapter in n.resident_adapter_ids and n.address == away.address for n in
                           router.nodes_stub.ListNodes(nodes_pb2.ListNodesRequest(), metadata=bearer(ADMIN_TOKEN),
                                                       timeout=10).nodes), what="the router sees the residency")
    before = away.stats().requests_finished
    complete(router, world.a.token, "customerA-travel")
    assert away.stats().requests_finished == before + 1


def long_request(model: str) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=model, prompt="go on",
                              sampling=gen.SamplingParams(max_tokens=480, ignore_eos=True, temperature=0))


def all_idle(nodes) -> bool:
    return all(s.running_requests == 0 and s.waiting_requests == 0 and s.kv_blocks_used == 0
               for s in (n.stats() for n in nodes))


def test_a_grpc_client_cancel_reaches_the_node_and_frees_its_kv(router, world, nodes):
    wait_until(lambda: all_idle(nodes), what="nodes idle before the test")
    before = finished(nodes)
    call = router.stub.Generate(long_request("customerA-legal"), metadata=bearer(world.a.token), timeout=120)
    next(call)
    assert any(n.stats().kv_blocks_used > 0 for n in nodes)  # it holds KV while it runs
    call.cancel()
    wait_until(lambda: all_idle(nodes), what="the cancelled request's KV is freed")
    assert finished(nodes) == before  # aborted, not run to its 480 tokens
    assert router.run(lambda: sum(n.in_flight for n in router.app.membership.nodes.values())) == 0


def test_an_http_client_that_drops_a_stream_frees_the_nodes_kv(router, world, nodes):
    wait_until(lambda: all_idle(nodes), what="nodes idle before the test")
    before = finished(nodes)
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    stream = client.completions.create(model="customerA-legal", prompt="go on", max_tokens=480, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    assert any(n.stats().kv_blocks_used > 0 for n in nodes)
    stream.close()
    wait_until(lambda: all_idle(nodes), what="the dropped stream's KV is freed")
    assert finished(nodes) == before


def test_an_http_client_that_hangs_up_on_a_non_streaming_request_frees_the_nodes_kv(router, world, nodes):
    wait_until(lambda: all_idle(nodes), what="nodes idle before the test")
    before = finished(nodes)
    host, port = router.base_url.removeprefix("http://").split("/")[0].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = json.dumps({"model": "customerA-legal", "prompt": "go on", "max_tokens": 480, "ignore_eos": True})
    connection.request("POST", "/v1/completions", body=body,
                       headers={"authorization": f"Bearer {world.a.token}", "content-type": "application/json"})
    wait_until(lambda: any(n.stats().running_requests for n in nodes), what="the request runs on a node")
    connection.close()  # hang up without reading the answer
    wait_until(lambda: all_idle(nodes), what="the abandoned request's KV is freed")
    assert finished(nodes) == before


def test_nodes_register_heartbeat_expire_and_drain(make_router, world, nodes):
    router = make_router([], heartbeat_interval_seconds=0.2)
    request = pb.GenerateRequest(model="tiny", prompt="hi", sampling=gen.SamplingParams(max_tokens=2))
    error = expect_error(grpc.StatusCode.UNAVAILABLE, router.stub.Complete, request,
                         metadata=bearer(world.a.token), timeout=30)
    assert "no inference node serves base model 'tiny'" in error.details()

    target = nodes[0]

    async def stats() -> NodeStats:
        reply = target.stats()
        return NodeStats(running_requests=reply.running_requests, waiting_requests=reply.waiting_requests,
                         resident_adapter_ids=tuple(reply.resident_adapter_ids))

    agent = router.run(lambda: NodeAgent(router.address, ADMIN_TOKEN, "node-x", target.address, "tiny", stats))
    beating = asyncio.run_coroutine_threadsafe(agent.run(), router.loop)

    def listed():
        return router.nodes_stub.ListNodes(nodes_pb2.ListNodesRequest(), metadata=bearer(ADMIN_TOKEN),
                                           timeout=10).nodes

    wait_until(lambda: [(n.node_id, n.health, n.is_static) for n in listed()] ==
               [("node-x", nodes_pb2.NODE_HEALTH_HEALTHY, False)], what="registered and healthy")
    assert router.stub.Complete(request, metadata=bearer(world.a.token), timeout=60).usage.completion_tokens == 2

    beating.cancel()  # the node goes silent
    wait_until(lambda: listed()[0].health == nodes_pb2.NODE_HEALTH_UNHEALTHY, what="missed heartbeats")
    error = expect_error(grpc.StatusCode.UNAVAILABLE, router.stub.Complete, request,
                         metadata=bearer(world.a.token), timeout=30)
    assert "no healthy inference node" in error.details()

    beating = asyncio.run_coroutine_threadsafe(agent.run(), router.loop)
    wait_until(lambda: listed()[0].health == nodes_pb2.NODE_HEALTH_HEALTHY, what="heartbeats resumed")
    beating.cancel()
    asyncio.run_coroutine_threadsafe(agent.stop(), router.loop).result(10)
    wait_until(lambda: not listed(), what="deregistered node removed")


@pytest.mark.parametrize(("token", "code"), [(None, grpc.StatusCode.UNAUTHENTICATED),
                                             ("tenant", grpc.StatusCode.PERMISSION_DENIED)])
def test_the_nodes_service_needs_the_admin_token(router, world, token, code):
    metadata = None if token is None else bearer(world.a.token)
    expect_error(code, router.nodes_stub.ListNodes, nodes_pb2.ListNodesRequest(), metadata=metadata, timeout=10)
    expect_error(code, router.nodes_stub.RegisterNode,
                 nodes_pb2.RegisterNodeRequest(node_id="evil", address="127.0.0.1:1"), metadata=metadata, timeout=10)
