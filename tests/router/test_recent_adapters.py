"""The router's memory of recently used adapters (for warming a node that joins): bounded,
least recently used out first, base-model requests not remembered."""

from __future__ import annotations

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

