"""An inference node started with --router-address registers with the router, heartbeats
its load, and deregisters on SIGTERM (the router then drains it)."""

from __future__ import annotations

import time

import grpc

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
