"""The node side of the Nodes service: keeps an inference node registered with a router.

`NodeAgent.run` registers, then heartbeats at the interval the router asks for with the
node's current load and resident adapters; a NOT_FOUND heartbeat (the router restarted
and forgot us) registers again, and an unreachable router is retried with backoff.
`deregister` (when the node starts shutting down, with `run` cancelled first so it cannot
register again) tells the router to place nothing more on the node while its calls in flight
finish, instead of the router finding out from refused calls or missed heartbeats; `close`
then closes the channel.
An inference process (or a sidecar next to one) runs it with `stats` reading its Stats.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import grpc

from services.common import keepalive, tls
from services.common.pb.loraplex.router.v1 import nodes_pb2, nodes_pb2_grpc
from services.router.nodes import NodeStats

log = logging.getLogger("loraplex.router.agent")


class NodeAgent:
    def __init__(self, router_address: str, admin_token: str, node_id: str, address: str, base_model: str,
                 stats: Callable[[], Awaitable[NodeStats]], timeout_s: float = 5.0,
                 client_tls: tls.ClientTls | None = None) -> None:
        self.node_id, self.address, self.base_model, self.stats = node_id, address, base_model, stats
        self.timeout_s = timeout_s
        self._metadata = (("authorization", f"Bearer {admin_token}"),)
        self._channel = tls.aio_channel(router_address, client_tls, keepalive.client_options())
        self._stub = nodes_pb2_grpc.NodesStub(self._channel)
        self.interval_s = 1.0
        self.registered = asyncio.Event()

    async def _register(self) -> None:
        reply = await self._stub.RegisterNode(
            nodes_pb2.RegisterNodeRequest(node_id=self.node_id, address=self.address, base_model=self.base_model),
            metadata=self._metadata, timeout=self.timeout_s)
        self.interval_s = max(0.05, reply.heartbeat_interval_ms / 1000)
        self.registered.set()

    async def _heartbeat(self) -> None:
        stats = await self.stats()
        load = nodes_pb2.NodeLoad(running_requests=stats.running_requests, waiting_requests=stats.waiting_requests,
                                  kv_blocks_used=stats.kv_blocks_used, kv_blocks_total=stats.kv_blocks_total,
                                  adapter_pages_used=stats.adapter_pages_used,
                                  adapter_pages_total=stats.adapter_pages_total)
        await self._stub.Heartbeat(nodes_pb2.HeartbeatRequest(node_id=self.node_id, load=load,
                                                              resident_adapter_ids=stats.resident_adapter_ids),
                                   metadata=self._metadata, timeout=self.timeout_s)

    async def run(self) -> None:
        backoff = 0.1
        while True:
            try:
                if not self.registered.is_set():
                    await self._register()
                await self._heartbeat()
                backoff = 0.1
                await asyncio.sleep(self.interval_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.NOT_FOUND:
                    self.registered.clear()  # the router forgot us: register again at once
                    continue
                log.warning("router unreachable for node %s (%s: %s); retrying", self.node_id, exc.code().name,
                            exc.details())
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)
            except Exception:  # noqa: BLE001 - e.g. the stats callback: keep the agent alive
                log.exception("heartbeat of node %s failed; retrying", self.node_id)
                await asyncio.sleep(backoff)
                backoff = min(5.0, backoff * 2)

    async def deregister(self) -> None:
        try:
            await self._stub.DeregisterNode(nodes_pb2.DeregisterNodeRequest(node_id=self.node_id),
                                            metadata=self._metadata, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            log.warning("could not deregister node %s: %s", self.node_id, exc.details())
        else:
            log.info("node %s deregistered from its router: no new requests while it drains", self.node_id)

    async def close(self) -> None:
        await self._channel.close()

    async def stop(self) -> None:
        """Deregisters and closes (a caller that has already cancelled `run`)."""
        await self.deregister()
        await self.close()
