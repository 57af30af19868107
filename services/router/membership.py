"""The inference nodes the Router knows, their health and their load.

Two ways in: static nodes from `--node` are polled (GetInfo for the base model and GetStats
every --node-poll-seconds); registered nodes (Nodes.RegisterNode) push their load and
resident adapters in heartbeats and are unhealthy after 3 missed intervals.

Health: a node is placeable only while HEALTHY. A poll the node refuses or answers "not
serving", a missed heartbeat window, or a request that finds the node unreachable marks it
UNHEALTHY at once: no new requests, and those still waiting there for their first token are
placed again elsewhere (a frozen or partitioned node never answers, and nothing has been sent
to their callers yet). Streams already running finish or fail on their own, except when the
node is marked for not answering (late polls, missed heartbeats): then `silent_since` says
from when it has been silent, and a stream that got nothing since ends at once (proxy.py),
also on a node that was already out for answering "no" (draining its streams) or that had
failed and come back before.
A poll that only runs past its deadline counts as slow: a node busy with a burst (a huge
prompt, a GC pause) answers late now and then, and taking it out for one late answer would
push its whole load onto the others; `slow_polls` late answers in a row mark it. Polls keep
trying an unhealthy node, and the first successful one brings it back.

A registered node is HEALTHY only once this router has reached it itself (a health check and
GetStats at its registered address): a heartbeat proves the node can reach the router, not
that the router can reach the node (a wrong --advertise-address, a firewall), and trusting it
would put a request on it after every heartbeat, each failing over. The poll probes a
registered node only while it is UNHEALTHY, so it comes back after a failure once it answers.

A static node's base model is read on every poll, not once: another process can come up at
the same address serving another model, and requests for the old one must not run there.

DRAINING (DeregisterNode) takes a node out until RegisterNode returns it (a restarted node
registers again by itself). A drained registered node that keeps heartbeating stays listed
as DRAINING; it leaves the table once it is silent for 3 intervals with no request left on
it. Dropping it as soon as it was idle let its next heartbeat get NOT_FOUND, which tells the
node agent "the router restarted, register again": an operator's drain undid itself.

Load = requests this router has in flight on the node + what the node reports running or
waiting beyond those (other routers' traffic). The local count moves with every request,
so placement sees its own decisions at once instead of waiting for the next poll; the same
goes for residency: an adapter just sent to a node counts as resident there until a
report newer than that request could have said otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import time
from collections.abc import Callable

from services.common.errors import InvalidArgument, NotFound
from services.router import metrics
from services.router.nodes import NodeClient, NodeFailure, NodeStats
from services.router.placement import NodeView

log = logging.getLogger("loraplex.router.nodes")
MISSED_HEARTBEATS = 3


class Health(enum.Enum):
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"


@dataclasses.dataclass(eq=False)
class Node:
    node_id: str
    address: str
    client: NodeClient
    is_static: bool
    base_model: str = ""
    health: Health = Health.UNHEALTHY
    stats: NodeStats = dataclasses.field(default_factory=NodeStats)
    last_seen: float = 0.0  # unix time of the last successful poll or heartbeat
    last_seen_mono: float = 0.0
    in_flight: int = 0
    in_flight_at_report: int = 0
    slow_polls: int = 0  # consecutive polls past their deadline
    unreachable: str = ""  # why this router's last probe of a registered node failed (logged once)
    #: Set when the node is marked failed: requests still waiting for their first token there
    #: stop waiting and go elsewhere (proxy.py). Cleared when it is healthy again.
    down: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    down_reason: str = ""
    #: When marked failed for not answering: a time (self.clock) by which the node had surely
    #: gone silent, the start of the last probe window it left unanswered. None when it was
    #: marked for answering "no" (refused, not serving): it is alive and may finish its streams.
    silent_since: float | None = None
    #: Called at each mark_failed that changes what is known (the streams running here: proxy.py).
    #: Callbacks, not `down`: that event stays set until the node is healthy again, so a stream
    #: waiting on it would hear of one failure only, never of a silence after a flap or a drain.
    on_failed: set[Callable[[], None]] = dataclasses.field(default_factory=set)
    #: adapter id -> monotonic time this router last sent it here (residency not yet reported).
    placed: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def load(self) -> int:
        others = max(0, self.stats.load - self.in_flight_at_report)
        return self.in_flight + others

    @property
    def resident(self) -> frozenset[str]:
        return frozenset(self.stats.resident_adapter_ids) | frozenset(self.placed)

    def view(self) -> NodeView:
        return NodeView(self.node_id, self.base_model, self.load, self.resident)


def _check_address(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) <= 65535:
        raise InvalidArgument(f"address must be host:port, got {address!r}", field="address")


class Membership:
    def __init__(self, connect: Callable[[str], NodeClient], poll_s: float, timeout_s: float,
                 heartbeat_s: float, clock: Callable[[], float] = time.monotonic, slow_polls: int = 3) -> None:
        self.connect, self.poll_s, self.timeout_s, self.heartbeat_s = connect, poll_s, timeout_s, heartbeat_s
        self.clock, self.slow_polls = clock, slow_polls
        self.nodes: dict[str, Node] = {}
        #: Called with a node each time it turns HEALTHY (joins or returns), on the poll's path:
        #: listeners must only take note (the prefetcher enqueues), never wait.
        self.on_healthy: list[Callable[[Node], None]] = []

    # --- membership changes ---
    def add_static(self, address: str) -> Node:
        node = Node(node_id=address, address=address, client=self.connect(address), is_static=True)
        self.nodes[node.node_id] = node
        return node

    def register(self, node_id: str, address: str, base_model: str) -> float:
        """Adds or refreshes a self-registered node; returns the heartbeat interval in seconds."""
        if not node_id:
            raise InvalidArgument("node_id is required", field="node_id")
        if not base_model:
            raise InvalidArgument("base_model is required: the Registry name of the model the node serves",
                                  field="base_model")
        _check_address(address)
        node = self.nodes.get(node_id)
        if node is not None and node.is_static:
            if node.health is Health.DRAINING and node.address == address:
                # An operator returning a static node drained with DeregisterNode: polls take it back.
                node.health = Health.UNHEALTHY
                log.info("static node %s (%s) is back in service", node_id, address)
                return self.heartbeat_s
            raise InvalidArgument(f"node id {node_id!r} is a static node of this router; pick another id",
                                  field="node_id")
        if node is None or node.address != address:
            if node is not None:
                asyncio.ensure_future(node.client.close())
            node = Node(node_id=node_id, address=address, client=self.connect(address), is_static=False)
            self.nodes[node_id] = node
        node.base_model = base_model
        # (Re-)registering asks for traffic again, even after a drain; the next poll makes it
        # HEALTHY once the router reaches it.
        node.health = Health.UNHEALTHY
        self._report(node, node.stats)
        log.info("node %s registered at %s (base model %s)", node_id, address, base_model)
        return self.heartbeat_s

    def heartbeat(self, node_id: str, stats: NodeStats) -> None:
        """Load and liveness only: health is the poll's to give (see the module docstring)."""
        node = self.nodes.get(node_id)
        if node is None or node.is_static:
            raise NotFound(f"node {node_id!r} is not registered; call RegisterNode again", field="node_id")
        self._report(node, stats)

    def deregister(self, node_id: str) -> None:
        node = self.nodes.get(node_id)
        if node is not None:
            node.health = Health.DRAINING
            self._forget_if_idle(node)

    # --- health and load ---
    def _healthy(self, node: Node) -> None:
        if node.health is Health.UNHEALTHY:
            log.info("node %s (%s) is healthy", node.node_id, node.address)
            node.health = Health.HEALTHY
            node.down.clear()
            for listener in self.on_healthy:
                try:
                    listener(node)
                except Exception:  # noqa: BLE001 - a listener's bug must not stop health checks
                    log.exception("a listener of node %s turning healthy failed", node.node_id)

    def _report(self, node: Node, stats: NodeStats) -> None:
        now = self.clock()
        node.stats, node.in_flight_at_report = stats, node.in_flight
        node.last_seen, node.last_seen_mono = time.time(), now
        # A report taken after a placement had time to load the adapter supersedes it.
        node.placed = {a: t for a, t in node.placed.items() if now - t < 2 * max(self.poll_s, self.heartbeat_s)}

    def mark_failed(self, node: Node, why: str, silent_since: float | None = None) -> None:
        """silent_since: see Node.silent_since. A node already out for answering "no" (draining
        its streams, say) that now goes silent is marked again, for its streams' sake."""
        if node.health is Health.HEALTHY:
            node.health = Health.UNHEALTHY
            node.down.set()
        elif not (node.health is Health.UNHEALTHY and node.silent_since is None and silent_since is not None):
            return
        log.warning("node %s (%s) is unhealthy: %s", node.node_id, node.address, why)
        node.down_reason, node.silent_since = why, silent_since
        for listener in list(node.on_failed):
            listener()

    def placeable(self) -> list[NodeView]:
        return [n.view() for n in self.nodes.values() if n.health is Health.HEALTHY and n.base_model]

    def serves(self, base_model: str) -> bool:
        """Whether any known node (healthy or not) serves it: tells "no node" from "none healthy"."""
        return any(n.base_model == base_model for n in self.nodes.values())

    def started(self, node: Node, adapter_id: str) -> None:
        node.in_flight += 1
        if adapter_id:
            node.placed[adapter_id] = self.clock()

    def finished(self, node: Node) -> None:
        node.in_flight -= 1
        self._forget_if_idle(node)

    def _silent_for(self, node: Node) -> float | None:
        """Seconds since a registered node's last heartbeat, when that is 3 intervals or more."""
        silent = self.clock() - node.last_seen_mono
        return silent if silent > MISSED_HEARTBEATS * self.heartbeat_s else None

    def _forget_if_idle(self, node: Node) -> None:
        if (node.health is Health.DRAINING and node.in_flight == 0 and not node.is_static
                and self._silent_for(node) is not None):
            if self.nodes.get(node.node_id) is node:
                del self.nodes[node.node_id]
                asyncio.ensure_future(node.client.close())

    # --- the loop ---
    async def run(self) -> None:
        """Polls static nodes, expires silent registered ones and probes unhealthy ones, forever."""
        while True:
            results = await asyncio.gather(*(self.poll(n) for n in list(self.nodes.values())),
                                           return_exceptions=True)
            for error in results:
                if isinstance(error, Exception):  # a bug must not stop health checks for good
                    log.error("polling a node failed unexpectedly", exc_info=error)
            metrics.HEALTHY_NODES.set(sum(n.health is Health.HEALTHY for n in self.nodes.values()))
            await asyncio.sleep(self.poll_s)

    async def poll(self, node: Node) -> None:
        if not node.is_static:
            await self._check_registered(node)
            return
        if node.health is Health.DRAINING:
            return
        asked_at = self.clock()
        try:
            # Recorded even if the node is not serving yet: "loading" is not "serves nothing".
            self._set_base_model(node, await node.client.base_model(self.timeout_s))
            stats = await node.client.stats(self.timeout_s)
        except NodeFailure as failure:
            # Only late answers count toward silence: a refusal marks the node at once, but one
            # late answer after it (a draining node, busy) is no more silence than it is from a
            # healthy node, and a mark for silence ends the streams still running there.
            node.slow_polls = node.slow_polls + 1 if failure.timed_out else 0
            if not failure.timed_out or node.slow_polls >= self.slow_polls:
                # A node that answered nothing since an earlier late poll was already silent when
                # this one began (with --node-slow-polls 1 the window is this poll alone).
                self.mark_failed(node, failure.error.message, silent_since=asked_at if failure.timed_out else None)
            else:
                log.info("node %s (%s) answered its health poll late (%d in a row): %s", node.node_id,
                         node.address, node.slow_polls, failure.error.message)
            return
        node.slow_polls = 0
        self._report(node, stats)
        self._healthy(node)

    @staticmethod
    def _set_base_model(node: Node, base_model: str) -> None:
        if base_model != node.base_model:
            if node.base_model:
                log.warning("static node %s now serves base model %r instead of %r (a new process at its "
                            "address); placing requests for %r there", node.address, base_model,
                            node.base_model, base_model)
            node.base_model, node.placed = base_model, {}  # what was resident belonged to the old model

    async def _check_registered(self, node: Node) -> None:
        silent = self._silent_for(node)
        if silent is not None:
            if node.health is Health.DRAINING:
                self._forget_if_idle(node)
            else:
                # Its next heartbeat was due about an interval after the last one: an interval more
                # of margin, and it was surely silent by then.
                self.mark_failed(node, f"no heartbeat for {silent:.1f}s",
                                 silent_since=node.last_seen_mono + 2 * self.heartbeat_s)
            return
        if node.health is not Health.UNHEALTHY:
            return
        try:
            await node.client.stats(self.timeout_s)
        except NodeFailure as failure:
            if failure.error.message != node.unreachable:
                log.warning("registered node %s heartbeats, but this router cannot use it at %s: %s",
                            node.node_id, node.address, failure.error.message)
            node.unreachable = failure.error.message
            return
        node.unreachable = ""
        self._healthy(node)  # not if it was drained meanwhile: only UNHEALTHY turns HEALTHY

    async def close(self) -> None:
        await asyncio.gather(*(n.client.close() for n in self.nodes.values()), return_exceptions=True)
