"""Cold-start-free hot swaps against real parts (Registry, Router, inference node processes):
a deployment bound, re-bound or following a new version has its adapter waiting in its home
node's host tier before any request, so the first request fetches nothing; with
--prefetch-adapters off the first request fetches it; a failed prefetch is counted and
changes nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.router.v1 import nodes_pb2
from services.common.pb.loraplex.router.v1 import router_pb2
from services.router.feed import FeedEvent
from services.router.placement import rendezvous_weight
from tests.conftest import stop_process, wait_for_health
from tests.registry.client import bearer, unique
from tests.registry.lora_files import make_peft_adapter
from tests.router.harness import NodeProcess, node_health, wait_until

HOST, DEVICE = inference_pb2.ADAPTER_TIER_HOST, inference_pb2.ADAPTER_TIER_DEVICE
#: The lone node's adapter pool: a rank-16 adapter can never fit there (FAILED_PRECONDITION).
LONE_NODE_PAGES = 8


@pytest.fixture(scope="module")
def lone_node(world, tiny_model_dir, tmp_path_factory) -> Iterator[NodeProcess]:
    """A node only this module's routers know: the session router, which prefetches too, never
    warms it, so what reaches it comes from the router under test."""
    node = NodeProcess(tiny_model_dir, world.registry.address, tmp_path_factory.mktemp("lone") / "node.log", 0,
                       "tiny", "--adapter-pool-pages", str(LONE_NODE_PAGES))
    wait_for_health(node.address, timeout=120, process=node.process)
    yield node
    node.close()
    stop_process(node.process)


def tiers_of(node: NodeProcess, adapter_id: str) -> set[int]:
    listed = node.stub.ListAdapters(inference_pb2.ListAdaptersRequest(), metadata=node.metadata, timeout=10)
    return {slot.tier for slot in listed.adapters if slot.adapter_id == adapter_id}


def home_of(nodes: list[NodeProcess], adapter_id: str) -> NodeProcess:
    """Static nodes are known by their address: the same rendezvous choice placement makes."""
    return max(nodes, key=lambda n: rendezvous_weight(adapter_id, n.address))


def upload(world, tiny_model_dir, tmp_path, name: str, seed: int, rank: int = 4) -> pb.Adapter:
    files = make_peft_adapter(tiny_model_dir, tmp_path / f"{name}-{seed}", r=rank, alpha=16, seed=seed)
    return world.a.upload(files, name=name, as_files=True).adapter


def bind(world, name: str, adapter_name: str, version: int = 0, replace: bool = False) -> None:
    world.a.BindDeployment(pb.BindDeploymentRequest(name=name, adapter_name=adapter_name, adapter_version=version,
                                                    replace=replace))


def complete(router, token: str, model: str) -> router_pb2.CompleteResponse:
    return router.stub.Complete(router_pb2.GenerateRequest(model=model, prompt="hello",
                                                           sampling=gen.SamplingParams(max_tokens=2)),
                                metadata=bearer(token), timeout=60)


def outcomes(router) -> dict[str, int]:
    return router.run(lambda: dict(router.app.prefetcher.outcomes))


def wait_warm(node: NodeProcess, adapter_id: str) -> None:
    wait_until(lambda: tiers_of(node, adapter_id) & {HOST, DEVICE}, 60,
               f"adapter {adapter_id} in the host tier of its home node {node.address}")


def first_request_fetches_nothing(router, world, node: NodeProcess, model: str, adapter_id: str) -> None:
    assert adapter_id not in node.stats().resident_adapter_ids  # host tier only: no device pages taken
    fetched = node.stats().adapter_fetches
    complete(router, world.a.token, model)
    served = node.stats()
    assert adapter_id in served.resident_adapter_ids  # it ran there, copied from the host tier
    assert served.adapter_fetches == fetched


def test_a_bound_then_rebound_deployment_waits_in_its_home_nodes_host_tier(world, nodes, make_router,
                                                                          tiny_model_dir, tmp_path):
    router = make_router([n.address for n in nodes])
    router.wait_healthy(len(nodes))
    model, adapter_name = unique("hot-swap"), unique("swap")
    v1 = upload(world, tiny_model_dir, tmp_path, adapter_name, seed=11)
    bind(world, model, adapter_name, version=1)
    home = home_of(nodes, v1.id)
    wait_warm(home, v1.id)
    assert all(not tiers_of(n, v1.id) for n in nodes if n is not home)
    first_request_fetches_nothing(router, world, home, model, v1.id)

    # The hot swap: the deployment re-pointed at a new version, whose home may be another node.
    v2 = upload(world, tiny_model_dir, tmp_path, adapter_name, seed=12)
    bind(world, model, adapter_name, version=2, replace=True)
    home = home_of(nodes, v2.id)
    wait_warm(home, v2.id)
    first_request_fetches_nothing(router, world, home, model, v2.id)
    assert outcomes(router)["host"] >= 2


def test_a_deployment_following_latest_is_warmed_when_a_version_is_uploaded(world, nodes, make_router,
                                                                          tiny_model_dir, tmp_path):
    router = make_router([n.address for n in nodes])
    router.wait_healthy(len(nodes))
    model, adapter_name = unique("latest"), unique("follow")
    v1 = upload(world, tiny_model_dir, tmp_path, adapter_name, seed=21)
    bind(world, model, adapter_name)  # no version: follows the newest
    wait_warm(home_of(nodes, v1.id), v1.id)
    v2 = upload(world, tiny_model_dir, tmp_path, adapter_name, seed=22)  # no bind: the upload is the swap
    home = home_of(nodes, v2.id)
    wait_warm(home, v2.id)
    first_request_fetches_nothing(router, world, home, model, v2.id)


def feed_head(world) -> int:
    stream = world.admin.WatchChanges(pb.WatchChangesRequest(after_sequence=-1), timeout=30)
    head = next(stream).sequence
    stream.cancel()
    return head


def test_with_prefetch_off_the_first_request_fetches_the_adapter(world, lone_node, make_router, tiny_model_dir,
                                                                 tmp_path):
    router = make_router([lone_node.address], prefetch_adapters=False)
    router.wait_healthy(1)
    assert router.run(lambda: router.app.prefetcher) is None
    model, adapter_name = unique("cold"), unique("cold")
    adapter = upload(world, tiny_model_dir, tmp_path, adapter_name, seed=31)
    bind(world, model, adapter_name)
    head = feed_head(world)
    wait_until(lambda: router.run(lambda: router.app.watcher.cursor) >= head, 30, "the router read the bind")
    assert not tiers_of(lone_node, adapter.id)
    fetched = lone_node.stats().adapter_fetches
    complete(router, world.a.token, model)
    assert lone_node.stats().adapter_fetches == fetched + 1


def failed_total() -> float:
    return REGISTRY.get_sample_value("loraplex_router_adapter_prefetches_total", {"outcome": "failed"}) or 0.0


def test_a_failed_prefetch_is_counted_and_leaves_requests_and_node_health_alone(world, lone_node, make_router,
                                                                                tiny_model_dir, tmp_path):
    router = make_router([lone_node.address])
    router.wait_healthy(1)
    counted = failed_total()
    too_big, too_big_name = unique("too-big"), unique("big")
    upload(world, tiny_model_dir, tmp_path, too_big_name, seed=41, rank=2 * LONE_NODE_PAGES)
    bind(world, too_big, too_big_name)  # the node refuses it: FAILED_PRECONDITION, more pages than its pool
    wait_until(lambda: outcomes(router).get("failed", 0) >= 1, 60, "the failed prefetch counted")
    assert failed_total() >= counted + 1
    assert node_health(router, lone_node.address) == nodes_pb2.NODE_HEALTH_HEALTHY

    # Prefetches and requests go on: another deployment is warmed and served from the host tier.
    model, adapter_name = unique("after-failure"), unique("fine")
    adapter = upload(world, tiny_model_dir, tmp_path, adapter_name, seed=42)
    bind(world, model, adapter_name)
    wait_warm(lone_node, adapter.id)
    first_request_fetches_nothing(router, world, lone_node, model, adapter.id)
    assert node_health(router, lone_node.address) == nodes_pb2.NODE_HEALTH_HEALTHY

    # A bind event that arrives once its deployment and adapter are gone (replayed after a
    # reconnect, say): the prefetch finds nothing to warm, and says so.
    world.a.UnbindDeployment(pb.UnbindDeploymentRequest(name=model))
    world.a.DeleteAdapter(pb.DeleteAdapterRequest(id=adapter.id))
    head = feed_head(world)
    wait_until(lambda: router.run(lambda: router.app.watcher.cursor) >= head, 30, "the router read the deletion")
    before = outcomes(router).get("not_found", 0)
    router.run(lambda: router.app.prefetcher.apply(FeedEvent(head, "DEPLOYMENT_BOUND", world.a.tenant_id, model)))
    wait_until(lambda: outcomes(router).get("not_found", 0) == before + 1, 30, "the vanished deployment counted")
