"""Placement as pure functions: residency first, rendezvous home, bounded load, spill order."""

from __future__ import annotations

import collections

from services.router.placement import NodeView, home_node, load_bound, place, rendezvous_weight, tenant_key

IDS = [f"node-{i}" for i in range(4)]


def nodes(loads=(0, 0, 0, 0), resident=None, base="tiny") -> list[NodeView]:
    resident = resident or {}
    return [NodeView(node_id, base, load, frozenset(resident.get(node_id, ())))
            for node_id, load in zip(IDS, loads)]


def home_order(adapter: str) -> list[str]:
    return sorted(IDS, key=lambda n: rendezvous_weight(adapter, n), reverse=True)


def test_a_resident_node_wins_over_the_home_node():
    adapter = "adp_1"
    not_home = home_order(adapter)[-1]
    chosen = place(nodes(resident={not_home: {adapter}}), "tiny", adapter, 1.25)
    assert (chosen.node_id, chosen.reason) == (not_home, "resident")


def test_without_residency_an_adapter_always_goes_home_and_homes_spread():
    homes = collections.Counter()
    for i in range(400):
        adapter = f"adp_{i}"
        first = place(nodes(), "tiny", adapter, 1.25)
        assert first == place(nodes(), "tiny", adapter, 1.25)  # stable, no shared state needed
        assert (first.node_id, first.reason) == (home_order(adapter)[0], "home")
        homes[first.node_id] += 1
    assert set(homes) == set(IDS) and min(homes.values()) > 50  # every node is home to a fair share


def test_removing_a_node_moves_only_the_adapters_it_was_home_to():
    before = {f"adp_{i}": place(nodes(), "tiny", f"adp_{i}", 1.25).node_id for i in range(200)}
    after = {a: place(nodes(), "tiny", a, 1.25, exclude={"node-0"}).node_id for a in before}
    moved = {a for a in before if before[a] != after[a]}
    assert moved == {a for a, n in before.items() if n == "node-0"}


def test_a_hot_adapter_spills_to_its_next_node_when_home_exceeds_the_bound():
    adapter = "hot"
    order = home_order(adapter)
    loads = {n: 0 for n in IDS}
    placed = []
    for _ in range(40):  # 40 concurrent requests for one adapter, none finishing
        view = [NodeView(n, "tiny", loads[n], frozenset({adapter}) if loads[n] else frozenset()) for n in IDS]
        bound = load_bound(list(loads.values()), 1.25)
        choice = place(view, "tiny", adapter, 1.25)
        loads[choice.node_id] += 1
        placed.append(choice.node_id)
        assert loads[choice.node_id] <= bound
    assert placed[0] == order[0]
    assert max(loads.values()) - min(loads.values()) <= 3  # never melts one node
    first_spill = next(n for n in placed if n != order[0])
    assert first_spill == order[1]  # overflow follows the adapter's rendezvous order


def test_base_requests_go_home_by_tenant_where_its_cached_prefixes_are():
    """The node's prefix cache is scoped per tenant: a tenant's base-model requests keep landing
    on one node (bounded like an adapter's), and tenants spread over the nodes."""
    homes = collections.Counter()
    for i in range(400):
        tenant = f"tnt_{i}"
        first = place(nodes(), "tiny", "", 1.25, tenant_id=tenant)
        assert first == place(nodes(), "tiny", "", 1.25, tenant_id=tenant)
        assert (first.node_id, first.reason) == (home_order(tenant_key(tenant))[0], "home")
        homes[first.node_id] += 1
    assert set(homes) == set(IDS) and min(homes.values()) > 50
    busy = home_order(tenant_key("tnt_hot"))[0]
    loads = tuple(10 if n == busy else 0 for n in IDS)
    spilled = place(nodes(loads=loads), "tiny", "", 1.25, tenant_id="tnt_hot")
    assert (spilled.node_id, spilled.reason) == (home_order(tenant_key("tnt_hot"))[1], "spill")
    # A tenant's adapter requests still follow the adapter, wherever the tenant's home is.
    assert place(nodes(), "tiny", "adp_9", 1.25, tenant_id="tnt_hot").node_id == home_order("adp_9")[0]


def test_the_bound_never_refuses_work_and_prefers_the_least_loaded_for_base_requests():
    chosen = place(nodes(loads=(5, 5, 5, 5)), "tiny", "", 1.0)
    assert chosen is not None and chosen.reason == "least_loaded"
    assert place(nodes(loads=(3, 0, 2, 1)), "tiny", "", 1.25).node_id == "node-1"


def test_only_nodes_of_the_base_model_and_not_excluded_are_candidates():
    mixed = nodes()[:2] + nodes(base="other")[2:]
    for i in range(50):
        assert place(mixed, "tiny", f"a{i}", 1.25).node_id in ("node-0", "node-1")
    assert place(mixed, "tiny", "x", 1.25, exclude={"node-0", "node-1"}) is None
    assert place(mixed, "missing", "x", 1.25) is None


def test_a_resident_but_overloaded_node_is_passed_over():
    adapter = "adp_7"
    busy = home_order(adapter)[0]
    loads = tuple(10 if n == busy else 0 for n in IDS)
    chosen = place(nodes(loads=loads, resident={busy: {adapter}}), "tiny", adapter, 1.25)
    assert chosen.node_id == home_order(adapter)[1] and chosen.reason == "spill"


def test_an_adapters_home_is_where_its_first_request_goes():
    for i in range(100):
        adapter = f"adp_{i}"
        assert home_node(nodes(), "tiny", adapter) == place(nodes(), "tiny", adapter, 1.25).node_id
    assert home_node(nodes(base="other"), "tiny", "adp_1") is None
