"""An inference node started with --router-address registers with the router, heartbeats
its load, and deregisters on SIGTERM, at once, while its calls in flight still finish (the
router places no new request on it meanwhile)."""

from __future__ import annotations

import contextlib
import signal
import socket
import time

import grpc

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2 as ipb
from services.common.pb.loraplex.inference.v1 import inference_pb2_grpc
from services.common.pb.loraplex.router.v1 import nodes_pb2, nodes_pb2_grpc
from tests.conftest import free_port, start_module, stop_process, wait_for_health

TOKEN = "admin-token-for-tests"


def list_nodes(router: str) -> list[nodes_pb2.NodeStatus]:
    with grpc.insecure_channel(router) as channel:
        reply = nodes_pb2_grpc.NodesStub(channel).ListNodes(
            nodes_pb2.ListNodesRequest(), metadata=[("authorization", f"Bearer {TOKEN}")], timeout=10)
    return list(reply.nodes)


def wait_for(predicate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := predicate()):
            return value
        time.sleep(0.1)
    raise AssertionError("condition not reached")


def test_node_registers_heartbeats_and_deregisters(tmp_path, tiny_model_dir, processes):
    router_port, node_port = free_port(), free_port()
    router = f"127.0.0.1:{router_port}"
    processes.append(start_module("services.router", "--port", str(router_port), "--http-port", "0",
                                  "--metrics-port", "0", "--admin-token", TOKEN,
                                  "--registry-address", f"127.0.0.1:{free_port()}", log=tmp_path / "router.log"))
    wait_for_health(router, process=processes[-1])
    node = start_module("services.inference", "--port", str(node_port), "--metrics-port", "0",
                        "--base-model", str(tiny_model_dir), "--admin-token", TOKEN, "--router-address", router,
                        "--node-id", "node-a", log=tmp_path / "node.log")
    processes.append(node)
    wait_for_health(f"127.0.0.1:{node_port}", process=node)

    registered = wait_for(lambda: [n for n in list_nodes(router)
                                   if n.node_id == "node-a" and n.health == nodes_pb2.NODE_HEALTH_HEALTHY])
    assert registered[0].address == f"127.0.0.1:{node_port}" and registered[0].base_model == "tiny"
    assert registered[0].load.kv_blocks_total > 0 and not registered[0].is_static

    assert stop_process(node) == 0
    wait_for(lambda: all(n.node_id != "node-a" or n.health != nodes_pb2.NODE_HEALTH_HEALTHY
                         for n in list_nodes(router)))


def start_router(tmp_path, processes) -> str:
    port = free_port()
    processes.append(start_module("services.router", "--port", str(port), "--http-port", "0", "--metrics-port", "0",
                                  "--admin-token", TOKEN, "--registry-address", f"127.0.0.1:{free_port()}",
                                  log=tmp_path / "router.log"))
    wait_for_health(f"127.0.0.1:{port}", process=processes[-1])
    return f"127.0.0.1:{port}"


def health_of(router: str, node_id: str) -> int | None:
    return next((n.health for n in list_nodes(router) if n.node_id == node_id), None)


def test_a_stopping_node_is_drained_by_the_router_while_its_calls_finish(tmp_path, tiny_model_dir, processes):
    """The node used to deregister only once its grace period had ended, so for all of it the
    router kept placing requests on a node that refused them. Held in flight here: a request
    whose adapter download hangs (a registry that accepts connections and never answers)."""
    router = start_router(tmp_path, processes)
    with contextlib.closing(socket.create_server(("127.0.0.1", 0))) as silent_registry:
        node_port = free_port()
        node = start_module("services.inference", "--port", str(node_port), "--metrics-port", "0",
                            "--base-model", str(tiny_model_dir), "--admin-token", TOKEN, "--router-address", router,
                            "--node-id", "node-d", "--grace-seconds", "60",
                            "--registry-address", f"127.0.0.1:{silent_registry.getsockname()[1]}",
                            log=tmp_path / "node.log")
        processes.append(node)
        wait_for_health(f"127.0.0.1:{node_port}", process=node)
        wait_for(lambda: health_of(router, "node-d") == nodes_pb2.NODE_HEALTH_HEALTHY)
        with grpc.insecure_channel(f"127.0.0.1:{node_port}") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            call = stub.Generate(ipb.GenerateRequest(prompt="hello", adapter=ipb.AdapterRef(adapter_id="adp_held"),
                                                     sampling=gen.SamplingParams(max_tokens=4)),
                                 metadata=[("authorization", f"Bearer {TOKEN}")], timeout=120)
            metadata = [("authorization", f"Bearer {TOKEN}")]
            wait_for(lambda: call.done() or any(
                a.adapter_id == "adp_held" and a.tier == ipb.ADAPTER_TIER_LOADING
                for a in stub.ListAdapters(ipb.ListAdaptersRequest(), metadata=metadata, timeout=10).adapters))
            assert not call.done()
            node.send_signal(signal.SIGTERM)
            wait_for(lambda: health_of(router, "node-d") in (nodes_pb2.NODE_HEALTH_DRAINING, None))
            assert not call.done() and node.poll() is None  # drained while its call is still in flight
            call.cancel()
        assert node.wait(60) == 0
