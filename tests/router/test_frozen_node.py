"""A real node process frozen (SIGSTOP: what a hung host or a partition without RST looks like)
after a request was placed on it: once the router marks the node failed, the request is
placed again on a live node and answered, instead of waiting out the caller's deadline."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.router.v1 import nodes_pb2
from services.common.pb.loraplex.router.v1 import router_pb2 as pb
from tests.conftest import stop_process, wait_for_health
from tests.router.harness import NodeProcess, bearer, node_health, start_agent, stop_agent, wait_until

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
