"""Killing real node processes: requests placed on a dead node before their first token are
retried on a live one; a stream whose node dies mid-way ends with UNAVAILABLE saying so."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import REGISTRY

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.router.v1 import nodes_pb2
from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from tests.router.conftest import CUSTOMER_A_MODEL, start_nodes, stop_nodes
from tests.conftest import stop_process, wait_for_health
from tests.router.harness import ADMIN_TOKEN, NodeProcess, bearer, wait_until


@pytest.fixture(scope="module")
def victims(world, tiny_model_dir, tmp_path_factory):
    started = start_nodes(2, world, tiny_model_dir, tmp_path_factory.mktemp("victim-logs"))
    yield started
    stop_nodes(started)


def kill(node) -> None:
    node.process.send_signal(signal.SIGKILL)
    node.process.wait(30)


def retries() -> float:
    return sum(sample.value for metric in REGISTRY.collect() if metric.name == "loraplex_router_node_retries"
               for sample in metric.samples if sample.name.endswith("_total"))


def health_of(router) -> dict[str, int]:
    return {n.address: n.health for n in router.nodes_stub.ListNodes(
        nodes_pb2.ListNodesRequest(), metadata=bearer(ADMIN_TOKEN), timeout=10).nodes}


def test_requests_placed_on_a_killed_node_are_retried_on_a_live_one(make_router, world, nodes, victims):
    victim = victims[0]
    # Slow polls: the router must find out about the death from the requests themselves.
    router = make_router([victim.address, nodes[0].address], node_poll_seconds=60)
    router.wait_healthy(2)
    kill(victim)
    before = retries()
    request = pb.GenerateRequest(model=CUSTOMER_A_MODEL, prompt="hi",
                                 sampling=gen.SamplingParams(max_tokens=4, ignore_eos=True))

    def one(_):
        return router.stub.Complete(request, metadata=bearer(world.a.token), timeout=60).usage.completion_tokens

    with ThreadPoolExecutor(6) as pool:  # concurrent, so bounded load sends some to the dead node
        assert list(pool.map(one, range(12))) == [4] * 12
    assert retries() > before  # some did hit the dead node, invisibly to the caller
    assert health_of(router)[victim.address] == nodes_pb2.NODE_HEALTH_UNHEALTHY
    assert health_of(router)[nodes[0].address] == nodes_pb2.NODE_HEALTH_HEALTHY


def test_a_node_dying_after_the_first_token_ends_the_stream_with_unavailable(make_router, world, victims):
    victim = victims[1]
    router = make_router([victim.address], node_poll_seconds=60)
    router.wait_healthy(1)
    call = router.stub.Generate(pb.GenerateRequest(
        model=CUSTOMER_A_MODEL, prompt="go on", sampling=gen.SamplingParams(max_tokens=480, ignore_eos=True)),
        metadata=bearer(world.a.token), timeout=60)
    first = next(call)
    assert first.delta.token_ids
    kill(victim)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed after" in caught.value.details() and "retry the whole request" in caught.value.details()
    with pytest.raises(grpc.RpcError) as caught:  # and the dead node takes no new work
        router.stub.Complete(pb.GenerateRequest(model=CUSTOMER_A_MODEL, prompt="hi"),
                             metadata=bearer(world.a.token), timeout=60)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_dead_static_node_is_retried_and_used_again_once_it_is_back(make_router, world, nodes, victims,
                                                                      tiny_model_dir, tmp_path):
    victim = victims[0]  # killed by the first test of this module
    if victim.process.poll() is None:
        kill(victim)
    router = make_router([victim.address, nodes[0].address])
    wait_until(lambda: health_of(router)[victim.address] == nodes_pb2.NODE_HEALTH_UNHEALTHY, what="seen dead")
    reborn = NodeProcess(tiny_model_dir, world.registry.address, tmp_path / "reborn.log", port=victim.port)
    try:
        wait_for_health(reborn.address, timeout=120, process=reborn.process)
        wait_until(lambda: health_of(router)[victim.address] == nodes_pb2.NODE_HEALTH_HEALTHY, what="back")
        request = pb.GenerateRequest(model="tiny", prompt="hi", sampling=gen.SamplingParams(max_tokens=2))
        with ThreadPoolExecutor(4) as pool:  # concurrent: bounded load puts some on the reborn node
            list(pool.map(lambda _: router.stub.Complete(request, metadata=bearer(world.a.token), timeout=60),
                          range(8)))
        assert reborn.stats().requests_finished > 0
    finally:
        reborn.close()
        stop_process(reborn.process)


def test_a_node_that_stops_serving_is_drained_until_it_serves_again(make_router):
    """A node that answers but reports NOT_SERVING (loading, or draining on SIGTERM) gets no
    new requests; the health poll brings it back once it is SERVING."""
    import asyncio

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    from services.common.pb.loraplex.inference.v1 import inference_pb2, inference_pb2_grpc
    from tests.conftest import free_port

    class Answering(inference_pb2_grpc.InferenceServicer):
        async def GetStats(self, request, context):
            return inference_pb2.Stats()

        async def GetInfo(self, request, context):
            return inference_pb2.ModelInfo(base_model="tiny")

    port = free_port()
    router = make_router([f"127.0.0.1:{port}"])
    health = HealthServicer()

    async def serve():
        server = grpc.aio.server()
        inference_pb2_grpc.add_InferenceServicer_to_server(Answering(), server)
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        return server

    def set_status(status) -> None:
        asyncio.run_coroutine_threadsafe(health.set("", status), router.loop).result(10)

    def health_is(want):
        return lambda: health_of(router)[f"127.0.0.1:{port}"] == want

    server = asyncio.run_coroutine_threadsafe(serve(), router.loop).result(10)
    try:
        wait_until(lambda: router.run(lambda: router.app.membership.nodes[f"127.0.0.1:{port}"].base_model == "tiny"),
                   what="the node answered GetInfo")
        assert health_is(nodes_pb2.NODE_HEALTH_UNHEALTHY)()
        set_status(health_pb2.HealthCheckResponse.SERVING)
        wait_until(health_is(nodes_pb2.NODE_HEALTH_HEALTHY), what="serving: placeable")
        set_status(health_pb2.HealthCheckResponse.NOT_SERVING)
        wait_until(health_is(nodes_pb2.NODE_HEALTH_UNHEALTHY), what="not serving: drained")
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), router.loop).result(10)
