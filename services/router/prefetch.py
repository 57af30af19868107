"""Cold-start-free hot swaps: a bound adapter is warmed on its home node before its first request.

Without this, the first request for a newly bound deployment (or one BindDeployment just
re-pointed at another adapter version) waits for its node to download the adapter from the
Registry, check its sha256 and parse it, and so does every request that arrives meanwhile.
When the change feed reports a deployment bound (DEPLOYMENT_BOUND), or a version uploaded
that deployments following "latest" now mean (ADAPTER_CREATED), the router resolves the
deployment and asks the adapter's home node (placement.home_node: the node its requests go
to first) to fetch it into its host tier (LoadAdapter host_only). The first request then
only copies it from host memory into device pages.

Host tier only: taking device pages ahead of traffic could evict an adapter traffic uses.
Best effort and off the hot path: the feed loop only enqueues (a bounded queue, duplicates
merged; beyond the bound a job is dropped and counted), and `concurrency` workers run the
Registry and node calls, so neither the feed nor requests ever wait for a prefetch. A
failure is logged and counted (loraplex_router_adapter_prefetches_total{outcome}) and never
marks a node unhealthy: health is the poll's to judge, and the first request fetches the
adapter itself, as without prefetch. Only deployments: base models need no adapter.

A node that joins or comes back healthy becomes the home of some adapters (rendezvous
hashing moves only those). The router remembers the adapters its own recent requests ran
with (recent_adapters.py) and, when a node turns healthy, prefetches there those whose home
it now is, through the same queue and workers. Only what this router served recently: an
adapter bound but unused, or used only through other routers, is fetched by its first
request there, as before (knowing it would mean resolving every tenant's deployments on
each join).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from typing import Protocol

from services.common.errors import NotFound
from services.router import metrics
from services.router.feed import FeedEvent
from services.router.membership import Membership, Node
from services.router.nodes import NodeFailure
from services.router.placement import home_node
from services.router.recent_adapters import RecentAdapters
from services.router.resolution import ModelEntry, Target

log = logging.getLogger("loraplex.router.prefetch")
#: Prefetches running at once per router: each holds a node's download slot and Registry
#: bandwidth, and a burst of binds should not crowd out the fetches of live requests.
CONCURRENCY = 4
#: Jobs waiting beyond the running ones; a burst past this is dropped (its requests fetch).
MAX_WAITING = 1024
#: Deadline of one node's prefetch: a large adapter's download, long enough not to give up on
#: a slow Registry, short enough that a hung node does not hold a worker for good.
NODE_TIMEOUT_S = 120.0
#: Remembered adapters whose home is checked between yields to the event loop on a join: each
#: check hashes the adapter with every healthy node, and requests must not wait for 4096 of them.
HOMES_PER_YIELD = 256


class DeploymentCatalog(Protocol):
    """The Registry, as the prefetcher needs it (NotFound for a name that is gone)."""

    async def resolve_deployment(self, name: str, tenant_id: str) -> Target: ...

    async def list_deployments(self, tenant_id: str) -> list[ModelEntry]: ...

    async def adapter_name(self, adapter_id: str) -> tuple[str, str]:
        """(name, base model) of an adapter version."""


@dataclasses.dataclass(frozen=True)
class _Job:
    tenant_id: str
    deployment: str = ""  # a deployment just bound
    new_adapter_id: str = ""  # a version just uploaded: the deployments following "latest" that now mean it
    joined_node: str = ""  # a node just turned healthy: the recently used adapters whose home it is now
    recent: Target | None = None  # one of those, to warm at its home


class AdapterPrefetcher:
    def __init__(self, catalog: DeploymentCatalog, membership: Membership, concurrency: int = CONCURRENCY,
                 max_waiting: int = MAX_WAITING, node_timeout_s: float = NODE_TIMEOUT_S) -> None:
        self.catalog, self.membership = catalog, membership
        self.concurrency, self.max_waiting, self.node_timeout_s = concurrency, max_waiting, node_timeout_s
        self._jobs: asyncio.Queue[_Job] = asyncio.Queue()
        self._waiting: set[_Job] = set()
        #: Recorded by the request path (proxy.py), read when a node joins.
        self.recent = RecentAdapters()
        #: This router's outcomes (the Prometheus counter sums every router in a process).
        self.outcomes: collections.Counter[str] = collections.Counter()

    def workers(self) -> list[asyncio.Task]:
        return [asyncio.ensure_future(self._work()) for _ in range(self.concurrency)]

    # --- the change feed's side: never waits ---
    def apply(self, event: FeedEvent) -> None:
        if event.kind == "DEPLOYMENT_BOUND":
            self._enqueue(_Job(event.tenant_id, deployment=event.subject))
        elif event.kind == "ADAPTER_CREATED":
            self._enqueue(_Job(event.tenant_id, new_adapter_id=event.subject))

    # --- membership's side (the health poll): never waits ---
    def node_healthy(self, node: Node) -> None:
        # Only a note: finding the adapters it is home to hashes thousands of them (a worker's job).
        if len(self.recent):
            self._enqueue(_Job("", joined_node=node.node_id))

    def _enqueue(self, job: _Job) -> None:
        if job in self._waiting:  # bound twice in a burst, or replayed after a reconnect: one prefetch
            return
        if len(self._waiting) >= self.max_waiting:
            log.warning("%d adapter prefetches waiting; dropping the one for %s", len(self._waiting), job)
            self._count("dropped")
            return
        self._waiting.add(job)
        self._jobs.put_nowait(job)

    # --- the workers ---
    async def _work(self) -> None:
        while True:
            job = await self._jobs.get()
            self._waiting.discard(job)  # a bind from now on is newer than what this job will read
            try:
                for target in await self._targets(job):
                    await self._prefetch(target)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a Registry outage or a bug: the first request fetches
                log.warning("prefetch for %s failed: %s", job, exc)
                self._count("failed")

    async def _targets(self, job: _Job) -> list[Target]:
        if job.recent is not None:
            return [job.recent]
        if job.joined_node:
            await self._enqueue_homed_on(job.joined_node)
            return []
        if job.deployment:
            try:
                return [await self.catalog.resolve_deployment(job.deployment, job.tenant_id)]
            except NotFound:  # unbound, or its adapter deleted, since the bind
                self._count("not_found")
                return []
        try:
            name, base_model = await self.catalog.adapter_name(job.new_adapter_id)
        except NotFound:  # deleted since its upload
            self._count("not_found")
            return []
        # Only this name's deployments can mean the new version: resolving every deployment of the
        # tenant on each upload made uploads cost O(deployments) Registry calls (bench/prefetch.py).
        following_latest = [entry for entry in await self.catalog.list_deployments(job.tenant_id)
                            if entry.adapter_name == name and entry.adapter_version == 0
                            and entry.base_model == base_model]
        targets = []
        for entry in following_latest:  # resolved still: "latest" is the Registry's to say
            try:
                target = await self.catalog.resolve_deployment(entry.name, job.tenant_id)
            except NotFound:
                continue
            if target.adapter_id == job.new_adapter_id:
                targets.append(target)
        return targets

    async def _enqueue_homed_on(self, node_id: str) -> None:
        """Queues the remembered adapters whose home `node_id` is now, as jobs of their own, so
        all the workers warm them and a bind meanwhile is not stuck behind the whole batch."""
        node = self.membership.nodes.get(node_id)
        if node is None or not node.base_model:
            return
        healthy = self.membership.placeable()  # the home among the nodes healthy now, this one included
        homed: list[Target] = []
        for checked, target in enumerate(self.recent.targets(node.base_model), start=1):
            if home_node(healthy, target.base_model, target.adapter_id) == node_id:
                homed.append(target)
            if checked % HOMES_PER_YIELD == 0:
                await asyncio.sleep(0)
        room = max(0, self.max_waiting - len(self._waiting))
        for target in homed[:room]:  # most recently used first
            self._enqueue(_Job(target.tenant_id, recent=target))
        if len(homed) > room:  # one line for the lot, not one per adapter
            log.warning("node %s joined: %d recently used adapters to warm there, %d dropped (queue full)",
                        node_id, len(homed), len(homed) - room)
            self._count("dropped", len(homed) - room)

    async def _prefetch(self, target: Target) -> None:
        if not target.adapter_id:
            return
        home = home_node(self.membership.placeable(), target.base_model, target.adapter_id)
        node = self.membership.nodes.get(home) if home is not None else None
        if node is None:
            self._count("no_node")
            return
        try:
            tier = await node.client.prefetch_adapter(target.adapter_id, target.adapter_sha256, self.node_timeout_s)
        except NodeFailure as failure:
            # Not mark_failed: a node that cannot fetch one adapter (its Registry link, a deleted
            # version) still serves everything else, and the health poll decides about the rest.
            log.warning("prefetching adapter %s (model %s) on node %s failed: %s", target.adapter_id, target.model,
                        node.node_id, failure.error.message)
            self._count("not_found" if isinstance(failure.error, NotFound) else "failed")
            return
        self._count(tier.lower())

    def _count(self, outcome: str, jobs: int = 1) -> None:
        self.outcomes[outcome] += jobs
        metrics.ADAPTER_PREFETCHES.labels(outcome).inc(jobs)
