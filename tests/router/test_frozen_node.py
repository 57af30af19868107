"""A node frozen (SIGSTOP: what a hung host or a partition without RST looks like) after a
request was placed on it: once the router marks the node failed, a request still waiting for
its first token is placed again on a live node and answered, instead of waiting out the
caller's deadline; a stream past its first token ends at once with UNAVAILABLE naming the
node, instead of hanging until keepalive gives the connection up."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.router.v1 import nodes_pb2
from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from tests.conftest import stop_process, wait_for_health
from tests.router.harness import HeldNode, NodeProcess, bearer, node_health, start_agent, stop_agent, wait_until

SHORT = pb.GenerateRequest(model="tiny", prompt="hi", sampling=gen.SamplingParams(max_tokens=2))


def test_a_request_stuck_on_a_frozen_node_is_answered_by_a_live_one(make_router, world, nodes, tiny_model_dir,
                                                                    tmp_path):
    frozen = NodeProcess(tiny_model_dir, world.registry.address, tmp_path / "frozen.log")
    router = make_router([], heartbeat_interval_seconds=0.2)
    agents = []
    try:
        wait_for_health(frozen.address, timeout=120, process=frozen.process)
        agents.append(start_agent(router, "frozen", frozen.address))
        wait_until(lambda: node_health(router, "frozen") == nodes_pb2.NODE_HEALTH_HEALTHY, what="registered")
        frozen.process.send_signal(signal.SIGSTOP)
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(router.stub.Complete, SHORT, metadata=bearer(world.a.token), timeout=30)
            wait_until(lambda: router.run(lambda: router.app.membership.nodes["frozen"].in_flight) == 1,
                       what="the request waits on the frozen node")
            agents.append(start_agent(router, "live", nodes[0].address))
            wait_until(lambda: node_health(router, "live") == nodes_pb2.NODE_HEALTH_HEALTHY, what="live node")
            agents[0][1].cancel()  # the frozen node's heartbeats stop, as they would from inside it
            # It used to wait for the deadline here: DEADLINE_EXCEEDED after 30s.
            assert answer.result().usage.completion_tokens == 2
        assert node_health(router, "frozen") == nodes_pb2.NODE_HEALTH_UNHEALTHY
        assert router.run(lambda: router.app.membership.nodes["frozen"].in_flight) == 0
        assert router.run(lambda: router.app.core.quotas.in_flight(world.a.tenant_id)) == 0
    finally:
        frozen.process.send_signal(signal.SIGCONT)
        for agent, beating in agents:
            stop_agent(router, agent, beating)
        frozen.close()
        stop_process(frozen.process)


def assert_the_stream_ends_when_its_node_freezes(router, node: HeldNode, node_id: str, world,
                                                  stop_heartbeats=lambda: None, meanwhile=lambda: None) -> None:
    """meanwhile: what happens to the node while the stream runs, before it freezes."""
    call = router.stub.Generate(pb.GenerateRequest(model="tiny", prompt="go on"), metadata=bearer(world.a.token),
                                timeout=30)
    assert [next(call).delta.text for _ in range(2)] == ["t0", "t1"]
    meanwhile()
    node.freeze()  # the connection stays up and answers HTTP/2 pings: keepalive would never end this
    stop_heartbeats()  # a frozen host sends none either
    with pytest.raises(grpc.RpcError) as caught:
        next(call)  # it used to wait for the caller's deadline
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    details = caught.value.details()
    assert f"inference node {node.address} failed after 2 tokens" in details
    assert "stopped answering mid-stream" in details and "retry the whole request" in details
    assert node_health(router, node_id) == nodes_pb2.NODE_HEALTH_UNHEALTHY
    wait_until(lambda: router.run(lambda: node.cancelled) == 1, what="the node call is cancelled")
    assert router.run(lambda: router.app.membership.nodes[node_id].in_flight) == 0
    assert router.run(lambda: router.app.core.quotas.in_flight(world.a.tenant_id)) == 0


def test_a_stream_whose_polled_node_freezes_after_its_first_token_ends_with_unavailable(held_node, world):
    router, node = held_node(node_timeout_seconds=0.5)  # three late polls: marked within a few seconds
    assert_the_stream_ends_when_its_node_freezes(router, node, node.address, world)


def test_a_stream_whose_registered_node_freezes_after_its_first_token_ends_with_unavailable(make_router, world):
    node = HeldNode()
    router = make_router([], heartbeat_interval_seconds=0.2)
    node.serve(router)
    agent, beating = start_agent(router, "held", node.address)
    try:
        wait_until(lambda: node_health(router, "held") == nodes_pb2.NODE_HEALTH_HEALTHY, what="registered")
        assert_the_stream_ends_when_its_node_freezes(router, node, "held", world, stop_heartbeats=beating.cancel)
    finally:
        stop_agent(router, agent, beating)
        node.stop()


def set_serving(router, node: HeldNode, serving: bool) -> None:
    node.serving = serving
    health = nodes_pb2.NODE_HEALTH_HEALTHY if serving else nodes_pb2.NODE_HEALTH_UNHEALTHY
    wait_until(lambda: node_health(router, node.address) == health, what=f"the node's health follows serving={serving}")


def test_a_stream_that_outlived_an_earlier_failure_of_its_node_still_ends_when_the_node_freezes(held_node, world):
    """The node was out for a moment (NOT_SERVING: alive, its streams run on) and came back;
    the router must still hear of its next failure. It heard of only the first: the stream
    waited for the caller's deadline."""
    router, node = held_node(node_timeout_seconds=0.5)
    assert_the_stream_ends_when_its_node_freezes(
        router, node, node.address, world, meanwhile=lambda: [set_serving(router, node, s) for s in (False, True)])


def test_a_stream_on_a_draining_node_ends_when_the_node_freezes(held_node, world):
    """NOT_SERVING (draining: it finishes its streams), then frozen: a node already out for
    answering "no" that then goes silent ends the streams it left silent."""
    router, node = held_node(node_timeout_seconds=0.5)
    assert_the_stream_ends_when_its_node_freezes(router, node, node.address, world,
                                                 meanwhile=lambda: set_serving(router, node, False))
