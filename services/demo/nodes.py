"""The inference nodes behind the Router: waiting for one, and reading their pool statistics."""

from __future__ import annotations

import time

from services.common.pb.loraplex.inference.v1 import inference_pb2 as ipb
from services.common.pb.loraplex.router.v1 import nodes_pb2 as npb
from services.demo.clients import Channels


def healthy_nodes(channels: Channels, base_model: str) -> list[npb.NodeStatus]:
    return [node for node in channels.nodes().ListNodes(npb.ListNodesRequest()).nodes
            if node.base_model == base_model and node.health == npb.NODE_HEALTH_HEALTHY]


def wait_for_node(channels: Channels, base_model: str, timeout: float) -> list[npb.NodeStatus]:
    """A compose stack's router can be up before any node has registered (or loaded its model)."""
    deadline = time.monotonic() + timeout
    while not (nodes := healthy_nodes(channels, base_model)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no healthy inference node serving {base_model!r} registered with the router "
                               f"within {timeout:.0f}s (is an inference service running, e.g. a compose profile?)")
        time.sleep(1.0)
    return nodes


def node_stats(channels: Channels) -> list[tuple[npb.NodeStatus, ipb.Stats]]:
    nodes = channels.nodes().ListNodes(npb.ListNodesRequest()).nodes
    return [(node, channels.inference(node.address).GetStats(ipb.GetStatsRequest())) for node in nodes]
