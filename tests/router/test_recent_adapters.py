"""The router's memory of recently used adapters (for warming a node that joins): bounded,
least recently used out first, base-model requests not remembered; and what a join queues
from it (only the adapters homed on the new node, the overflow counted as dropped)."""

from __future__ import annotations

import asyncio

from services.router.membership import Health, Membership
from services.router.placement import home_node
from services.router.prefetch import AdapterPrefetcher
from services.router.recent_adapters import RecentAdapters
from services.router.resolution import Target


def used(adapter: str, base_model: str = "tiny") -> Target:
    return Target(model=f"deploy-{adapter}", base_model=base_model, tenant_id="t", adapter_id=adapter,
                  adapter_sha256=f"sha-{adapter}")


def test_the_bound_holds_and_the_least_recently_used_go_first():
    recent = RecentAdapters(max_remembered=3)
    for adapter in ("a", "b", "c"):
        recent.record(used(adapter))
    recent.record(used("a"))  # used again: now the most recent, "b" the oldest
    recent.record(used("d"))
    assert len(recent) == 3
    assert [t.adapter_id for t in recent.targets("tiny")] == ["d", "a", "c"]
    for n in range(100):
        recent.record(used(f"x{n}"))
    assert len(recent) == 3
    assert [t.adapter_id for t in recent.targets("tiny")] == ["x99", "x98", "x97"]


def test_one_entry_per_adapter_version_and_base_model_only_for_adapters():
    recent = RecentAdapters(max_remembered=10)
    recent.record(used("a"))
    recent.record(Target(model="other-name", base_model="tiny", tenant_id="t", adapter_id="a", adapter_sha256="sha-a"))
    recent.record(used("a", base_model="big"))
    recent.record(Target(model="tiny", base_model="tiny", tenant_id="t"))  # the base model alone: nothing to warm
    assert len(recent) == 2
    assert [t.model for t in recent.targets("tiny")] == ["other-name"]  # the last deployment that used it
    assert [t.base_model for t in recent.targets("big")] == ["big"]


def test_a_join_queues_only_the_adapters_homed_there_and_counts_what_does_not_fit():
    membership = Membership(lambda address: None, poll_s=1, timeout_s=1, heartbeat_s=1)
    for address in ("old:1", "new:1"):
        node = membership.add_static(address)
        node.base_model, node.health = "tiny", Health.HEALTHY
    prefetcher = AdapterPrefetcher(catalog=None, membership=membership, max_waiting=2)
    for n in range(40):
        prefetcher.recent.record(used(f"adp_{n}"))
    prefetcher.recent.record(used("adp_other", base_model="big"))  # served by no node: never queued
    homed = [t.adapter_id for t in prefetcher.recent.targets("tiny")
             if home_node(membership.placeable(), "tiny", t.adapter_id) == "new:1"]
    assert len(homed) > 2  # 40 adapters, each homed there with probability 1/2

    prefetcher.node_healthy(membership.nodes["new:1"])  # only notes it: nothing is hashed on the poll's path
    assert [job.joined_node for job in prefetcher._waiting] == ["new:1"]
    prefetcher._waiting.discard(prefetcher._jobs.get_nowait())  # a worker takes the join's job
    asyncio.run(prefetcher._enqueue_homed_on("new:1"))
    queued = [job.recent.adapter_id for job in prefetcher._waiting]
    assert sorted(queued) == sorted(homed[:2])  # the most recently used, up to the queue's bound
    assert prefetcher.outcomes["dropped"] == len(homed) - 2
