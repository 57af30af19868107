"""The Inference node process: builds the Node, serves it, keeps its metrics fresh and,
with --router-address, keeps it registered with a router (router/node_agent.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.common.services import INFERENCE
from services.common.pb.loraplex.inference.v1 import inference_pb2_grpc
from services.inference.config import InferenceConfig
from services.inference.metrics import publish
from services.inference.node import Node
from services.inference.pool_admin import PoolAdmin
from services.inference.servicer import InferenceServicer
from services.router.node_agent import NodeAgent
from services.router.nodes import NodeStats

log = logging.getLogger("loraplex.inference")


class InferenceApp:
    service_names = [INFERENCE.full_name]

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.node: Node | None = None
        self._servicer = InferenceServicer(config.admin_token)
        self._metrics_task: asyncio.Task | None = None
        self._agent: NodeAgent | None = None
        self._agent_task: asyncio.Task | None = None
        self._deregistered = False

    def add_to_server(self, server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        if not self.config.admin_token:
            # As the registry and the trainer say: an open node lets whoever reaches it run any
            # tenant's adapter past the router's checks and quotas.
            log.warning("no --admin-token: this node takes every call without credentials (anyone who reaches "
                        "%s:%d can run any adapter) and the registry refuses its adapter downloads",
                        self.config.host, self.config.port)
        self.node = await asyncio.to_thread(Node.build, self.config)
        self.node.start()
        admin = PoolAdmin(self.node)
        self._servicer.ready(self.node, admin)
        self._metrics_task = asyncio.ensure_future(self._refresh_metrics(admin))
        if self.config.router_address:
            self._agent = NodeAgent(self.config.router_address, self.config.admin_token,
                                    self.config.resolved_node_id, self.config.resolved_advertise_address,
                                    self.config.resolved_base_model_name, lambda: self._node_stats(admin),
                                    client_tls=self.config.client_tls)
            self._agent_task = asyncio.ensure_future(self._agent.run())

    @staticmethod
    async def _node_stats(admin: PoolAdmin) -> NodeStats:
        stats = await admin.stats()
        return NodeStats(stats.running_requests, stats.waiting_requests, stats.kv_blocks_used, stats.kv_blocks_total,
                         stats.pool.pages_used, stats.pool.pages_total, tuple(stats.resident_adapter_ids))

    async def _refresh_metrics(self, admin: PoolAdmin) -> None:
        while True:
            publish(await admin.stats())
            await asyncio.sleep(2)

    async def drain(self) -> None:
        """Shutdown began: the router places nothing more here while calls in flight finish."""
        if self._agent is not None and not self._deregistered:
            self._deregistered = True
            await _cancelled(self._agent_task)  # a heartbeat after this would register us again
            await self._agent.deregister()

    async def close(self) -> None:
        await self.drain()  # when `serve` did not (a stop during warm-up, an in-process server)
        await _cancelled(self._metrics_task)
        if self._agent is not None:
            await self._agent.close()
        if self.node is not None:
            self.node.close()


async def _cancelled(task: asyncio.Task | None) -> None:
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
