"""Which inference node runs a request: adapter residency first, then a stable home per
adapter (per tenant for base-model requests), with bounded load.

Choice: consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018),
using rendezvous (highest-random-weight) hashing for the node order, plus a residency
preference in front of it:

1. Only healthy nodes serving the request's base model are candidates, and only those
   whose load after taking this request stays within the bound
   `ceil(c * (total_load + 1) / n)` (c = --load-balance-factor, default 1.25). At least
   one node always qualifies (the least loaded one), so the bound never refuses work; it
   only decides where work goes.
2. Among those, a node where the adapter is already resident wins (least loaded first):
   no adapter load, no page churn, and the request can join a batch at once.
3. Otherwise the adapter's rendezvous order picks it: the first qualifying node in
   `sorted(nodes, key=hash(adapter, node))`. Every router computes the same order with no
   shared state, so an adapter keeps landing on the same node (one resident copy instead
   of a copy on every node), and adding or removing a node only moves the adapters whose
   first choice it was.
4. Requests without an adapter go home by their tenant the same way (rendezvous order of the
   tenant id, bounded loads): a node's prefix cache is scoped per tenant (the router's
   cache_scope), so a tenant's repeated system prompt is found on the node that computed it
   instead of being computed again on whichever node was least loaded. Without a tenant,
   the least loaded node.

Why bounded loads and not plain affinity: a hot adapter would otherwise melt its home
node while the others idle. With the bound, once the home holds more than c times its fair
share, the overflow spills to the adapter's *next* node in rendezvous order, which then
becomes resident there too: hot adapters get as many replicas as their load needs, cold
ones keep exactly one, and no node is ever more than c times the mean (+1) busier than
the rest. Load is requests running + waiting on the node (see membership.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Collection, Sequence


@dataclasses.dataclass(frozen=True)
class NodeView:
    node_id: str
    base_model: str
    load: int
    resident: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Placement:
    node_id: str
    #: resident | home | spill | least_loaded (for metrics and tests).
    reason: str


def rendezvous_weight(key: str, node_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def load_bound(loads: Sequence[int], factor: float) -> int:
    """The most requests a node may hold after taking one more."""
    return math.ceil(factor * (sum(loads) + 1) / len(loads))


def place(nodes: Sequence[NodeView], base_model: str, adapter_id: str, factor: float,
          exclude: Collection[str] = (), tenant_id: str = "") -> Placement | None:
    """Where to run a request, or None when no node serves `base_model`."""
    candidates = [n for n in nodes if n.base_model == base_model and n.node_id not in exclude]
    if not candidates:
        return None
    bound = load_bound([n.load for n in candidates], factor)
    allowed = [n for n in candidates if n.load + 1 <= bound] or [min(candidates, key=lambda n: n.load)]
    if not adapter_id and not tenant_id:
        best = min(allowed, key=lambda n: (n.load, -rendezvous_weight("", n.node_id)))
        return Placement(best.node_id, "least_loaded")
    resident = [n for n in allowed if adapter_id and adapter_id in n.resident]
    if resident:
        best = min(resident, key=lambda n: (n.load, -rendezvous_weight(adapter_id, n.node_id)))
        return Placement(best.node_id, "resident")
    key = adapter_id or tenant_key(tenant_id)
    home = _first_in_rendezvous_order(candidates, key)
    best = _first_in_rendezvous_order(allowed, key)
    return Placement(best.node_id, "home" if best is home else "spill")


def home_node(nodes: Sequence[NodeView], base_model: str, adapter_id: str) -> str | None:
    """The adapter's home: where `place` sends its requests while no node holds it and the home
    is within the load bound (the router prefetches it there). None when no node serves
    `base_model`."""
    candidates = [n for n in nodes if n.base_model == base_model]
    return _first_in_rendezvous_order(candidates, adapter_id).node_id if candidates else None


def _first_in_rendezvous_order(nodes: Sequence[NodeView], key: str) -> NodeView:
    return max(nodes, key=lambda n: rendezvous_weight(key, n.node_id))


def tenant_key(tenant_id: str) -> str:
    """The rendezvous key of a tenant's base-model requests (never an adapter id: those start adp_)."""
    return f"tenant\0{tenant_id}"
