"""Node membership as an operator lives it, with real routers and real node processes: a drain
(DeregisterNode) of a live registered node holds while its stream finishes and after, until
RegisterNode returns it; a node that heartbeats from an address the router cannot reach is
never placed on; a static address taken over by a node of another base model stops getting
the old model's requests."""

from __future__ import annotations

import signal
import time

import grpc

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.router.v1 import nodes_pb2
from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from tests.conftest import free_port, stop_process, wait_for_health
from tests.registry.client import expect_error
from tests.router.harness import (ADMIN_TOKEN, NodeProcess, bearer, node_entry, node_health, start_agent,
                                  stop_agent, wait_until)

ADMIN = bearer(ADMIN_TOKEN)
SHORT = pb.GenerateRequest(model="tiny", prompt="hi", sampling=gen.SamplingParams(max_tokens=2))


def test_an_operators_drain_of_a_registered_node_holds_until_it_is_registered_again(make_router, world, nodes):
    """It used to last only until the node was idle: the router then forgot it, the node's next
    heartbeat got NOT_FOUND ("the router restarted") and the agent registered it again."""
    router = make_router([], heartbeat_interval_seconds=0.2)
    agent, beating = start_agent(router, "node-d", nodes[0].address)
    try:
        wait_until(lambda: node_health(router, "node-d") == nodes_pb2.NODE_HEALTH_HEALTHY, what="registered")
        stream = router.stub.Generate(pb.GenerateRequest(
            model="tiny", prompt="go on", sampling=gen.SamplingParams(max_tokens=200, ignore_eos=True)),
            metadata=bearer(world.a.token), timeout=120)
        first = next(stream)

        router.nodes_stub.DeregisterNode(nodes_pb2.DeregisterNodeRequest(node_id="node-d"), metadata=ADMIN,
                                         timeout=10)
        assert node_health(router, "node-d") == nodes_pb2.NODE_HEALTH_DRAINING
        error = expect_error(grpc.StatusCode.UNAVAILABLE, router.stub.Complete, SHORT,
                             metadata=bearer(world.a.token), timeout=30)
        assert "no healthy inference node" in error.details()
        # The stream already running is drained, not cut.
        rest = [m for m in stream]
        assert len(first.delta.token_ids) + sum(len(m.delta.token_ids) for m in rest) == 200
        idle_since = time.time()
        wait_until(lambda: router.run(lambda: (sum(n.in_flight for n in router.app.membership.nodes.values()),
                                               router.app.core.quotas.in_flight(world.a.tenant_id))) == (0, 0),
                   what="the drained stream's node slot and quota slot are given back")

        # Idle and still heartbeating: listed, and still drained.
        wait_until(lambda: (found := node_entry(router, "node-d")) is not None and found.last_seen.ToNanoseconds()
                   > idle_since * 1e9, what="a heartbeat from the idle drained node")
        assert node_health(router, "node-d") == nodes_pb2.NODE_HEALTH_DRAINING
        expect_error(grpc.StatusCode.UNAVAILABLE, router.stub.Complete, SHORT, metadata=bearer(world.a.token),
                     timeout=30)

        register_and_serve(router, world, "node-d", nodes[0].address)  # back in service
    finally:
        stop_agent(router, agent, beating)


def register_and_serve(router, world, node_id: str, address: str) -> None:
    """RegisterNode as an operator would; the node turns HEALTHY and answers a request."""
    router.nodes_stub.RegisterNode(nodes_pb2.RegisterNodeRequest(node_id=node_id, address=address, base_model="tiny"),
                                   metadata=ADMIN, timeout=10)
    wait_until(lambda: node_health(router, node_id) == nodes_pb2.NODE_HEALTH_HEALTHY, what=f"{node_id} in service")
    assert router.stub.Complete(SHORT, metadata=bearer(world.a.token), timeout=60).usage.completion_tokens == 2


def test_a_registered_node_the_router_cannot_reach_is_never_placed_on(make_router, world, nodes):
    """A heartbeat shows the node reaches the router, not the reverse (a wrong --advertise-address).
    Such a node used to turn HEALTHY with every heartbeat: ListNodes said so, and requests kept
    being placed on it, each failing (the only node: every request UNAVAILABLE "failed before
    the first token")."""
    router = make_router([], heartbeat_interval_seconds=0.2)
    agent, beating = start_agent(router, "node-u", f"127.0.0.1:{free_port()}")  # nothing listens there
    try:
        wait_until(lambda: (found := node_entry(router, "node-u")) is not None and found.last_seen.seconds,
                   what="registered")
        registered_at = node_entry(router, "node-u").last_seen.ToNanoseconds()
        wait_until(lambda: node_entry(router, "node-u").last_seen.ToNanoseconds() > registered_at,
                   what="heartbeats after registering")
        assert node_health(router, "node-u") == nodes_pb2.NODE_HEALTH_UNHEALTHY
        error = expect_error(grpc.StatusCode.UNAVAILABLE, router.stub.Complete, SHORT,
                             metadata=bearer(world.a.token), timeout=30)
        assert "no healthy inference node serves base model 'tiny'" in error.details()

        register_and_serve(router, world, "node-u", nodes[0].address)  # the operator fixed the address
    finally:
        stop_agent(router, agent, beating)


def test_a_static_address_taken_over_by_another_base_model_stops_serving_the_old_one(
        make_router, world, tiny_model_dir, tmp_path):
    """The base model used to be read once per address: a new process there serving another
    model kept getting the old model's requests, and answered them with the wrong model."""
    old = NodeProcess(tiny_model_dir, world.registry.address, tmp_path / "old.log")
    new = None
    try:
        wait_for_health(old.address, timeout=120, process=old.process)
        router = make_router([old.address])
        router.wait_healthy(1)
        assert router.stub.Complete(SHORT, metadata=bearer(world.a.token), timeout=60).usage.completion_tokens == 2
        old.process.send_signal(signal.SIGKILL)
        old.process.wait(30)
        new = NodeProcess(tiny_model_dir, world.registry.address, tmp_path / "new.log", port=old.port,
                          base_model_name="other-model")
        wait_for_health(new.address, timeout=120, process=new.process)
        wait_until(lambda: (found := node_entry(router, old.address)).base_model == "other-model"
                   and found.health == nodes_pb2.NODE_HEALTH_HEALTHY, what="the router sees the new base model")
        error = expect_error(grpc.StatusCode.UNAVAILABLE, router.stub.Complete, SHORT,
                             metadata=bearer(world.a.token), timeout=30)
        assert "no inference node serves base model 'tiny'" in error.details()
        assert new.stats().requests_finished == 0
    finally:
        for node in (old, new):
            if node is not None:
                node.close()
                stop_process(node.process)
