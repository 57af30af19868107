"""A node that comes back into service is warmed, against real parts (Registry, Router, node
processes): the adapters the router's recent requests used whose home it becomes wait in its
host tier before any request reaches it there, so that request fetches nothing; with
--prefetch-adapters off nothing is warmed and the request fetches its adapter.

The returning node is drained (DeregisterNode) while the adapters are bound and used, and
returned (RegisterNode at its address): the same path as a node that fails and recovers, or
starts late, turning HEALTHY. Then the node that stayed is drained, so the requests after the
return can only go to the returning node (not to the one where the adapters are resident)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.router.v1 import nodes_pb2
from tests.conftest import stop_process, wait_for_health
from tests.registry.client import bearer, unique
from tests.router.harness import ADMIN_TOKEN, NodeProcess, node_health, wait_until
from tests.router.test_adapter_prefetch import (bind, complete, first_request_fetches_nothing, home_of, tiers_of,
                                                upload, wait_warm)

ADMIN = bearer(ADMIN_TOKEN)
#: Adapters uploaded at most while looking for one whose home each node is (each 1 in 2).
MAX_UPLOADS = 16


@pytest.fixture(scope="module")
def own_nodes(world, tiny_model_dir, tmp_path_factory) -> Iterator[list[NodeProcess]]:
    """Two nodes only this module's routers know: no other router's prefetch warms them."""
    logs = tmp_path_factory.mktemp("join-warm")
    started = [NodeProcess(tiny_model_dir, world.registry.address, logs / f"node-{i}.log") for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda n: wait_for_health(n.address, timeout=120, process=n.process), started))
    yield started
    for node in started:
        node.close()
        stop_process(node.process)


def drain(router, node: NodeProcess) -> None:
    router.nodes_stub.DeregisterNode(nodes_pb2.DeregisterNodeRequest(node_id=node.address), metadata=ADMIN,
                                     timeout=10)
    assert node_health(router, node.address) == nodes_pb2.NODE_HEALTH_DRAINING


def bring_back(router, node: NodeProcess) -> None:
    """An operator returning a drained static node: the router's next poll makes it HEALTHY."""
    router.nodes_stub.RegisterNode(nodes_pb2.RegisterNodeRequest(node_id=node.address, address=node.address,
                                                                 base_model="tiny"), metadata=ADMIN, timeout=10)


def deployed(world, tiny_model_dir, tmp_path, nodes, returning) -> dict[str, pb.Adapter]:
    """Deployments bound before the router under test starts (it reads the change feed from its
    head: no bind prefetch of its own can warm them), until at least one adapter's home among
    both nodes is `returning` and one's is not."""
    bound: dict[str, pb.Adapter] = {}
    for seed in range(MAX_UPLOADS):
        model, adapter_name = unique("join-warm"), unique("jw")
        bound[model] = upload(world, tiny_model_dir, tmp_path, adapter_name, seed=100 + seed)
        bind(world, model, adapter_name)
        if {home_of(nodes, adapter.id) is returning for adapter in bound.values()} == {True, False}:
            return bound
    pytest.fail(f"no two of {MAX_UPLOADS} adapters had different homes")


def used_while_away(router, world, used: dict[str, pb.Adapter], returning: NodeProcess) -> None:
    """Each deployment requested once while `returning` is drained: the other node serves them all."""
    drain(router, returning)
    for model in used:
        complete(router, world.a.token, model)
    assert all(not tiers_of(returning, adapter.id) for adapter in used.values())  # nothing went there


def moved_home(used: dict[str, pb.Adapter], nodes, returning) -> dict[str, pb.Adapter]:
    return {model: adapter for model, adapter in used.items() if home_of(nodes, adapter.id) is returning}


def test_a_returning_node_is_warmed_with_the_recent_adapters_whose_home_it_becomes(world, own_nodes, make_router,
                                                                                   tiny_model_dir, tmp_path):
    staying, returning = own_nodes
    used = deployed(world, tiny_model_dir, tmp_path, own_nodes, returning)
    moving = moved_home(used, own_nodes, returning)
    router = make_router([n.address for n in own_nodes])
    router.wait_healthy(2)
    used_while_away(router, world, used, returning)

    bring_back(router, returning)
    for adapter in moving.values():
        wait_warm(returning, adapter.id)
    # Only the adapters whose home it became: the others stay home on the node that stayed.
    assert all(not tiers_of(returning, a.id) for m, a in used.items() if m not in moving)

    wait_until(lambda: router.run(lambda: router.app.prefetcher.outcomes["host"]) >= len(moving), 30,
               "the warm-ups counted")
    drain(router, staying)  # the adapters are resident there: this sends their requests home
    model, adapter = next(iter(moving.items()))
    first_request_fetches_nothing(router, world, returning, model, adapter.id)


def test_with_prefetch_off_a_returning_node_is_not_warmed(world, own_nodes, make_router, tiny_model_dir, tmp_path):
    staying, returning = own_nodes
    used = deployed(world, tiny_model_dir, tmp_path, own_nodes, returning)
    model, adapter = next(iter(moved_home(used, own_nodes, returning).items()))
    router = make_router([n.address for n in own_nodes], prefetch_adapters=False)
    router.wait_healthy(2)
    used_while_away(router, world, used, returning)

    bring_back(router, returning)
    router.wait_healthy(2)
    drain(router, staying)
    assert not tiers_of(returning, adapter.id)
    fetched = returning.stats().adapter_fetches
    complete(router, world.a.token, model)
    assert returning.stats().adapter_fetches == fetched + 1
