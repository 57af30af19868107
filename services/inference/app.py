"""The Inference node process: builds the Node, serves it, keeps its metrics fresh."""

from __future__ import annotations

import asyncio
import contextlib

from services.common.services import INFERENCE
from services.common.pb.loraplex.inference.v1 import inference_pb2_grpc
from services.inference.config import InferenceConfig
from services.inference.metrics import publish
from services.inference.node import Node
from services.inference.pool_admin import PoolAdmin
from services.inference.servicer import InferenceServicer


class InferenceApp:
    service_names = [INFERENCE.full_name]

    def __init__(self, config: InferenceConfig) -> None:
        self.config = config
        self.node: Node | None = None
        self._servicer = InferenceServicer()
        self._metrics_task: asyncio.Task | None = None

    def add_to_server(self, server) -> None:
        inference_pb2_grpc.add_InferenceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        self.node = await asyncio.to_thread(Node.build, self.config)
        self.node.start()
        admin = PoolAdmin(self.node)
        self._servicer.ready(self.node, admin)
        self._metrics_task = asyncio.ensure_future(self._refresh_metrics(admin))

    async def _refresh_metrics(self, admin: PoolAdmin) -> None:
        while True:
            publish(await admin.stats())
            await asyncio.sleep(2)

    async def close(self) -> None:
        if self._metrics_task is not None:
            self._metrics_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._metrics_task
        if self.node is not None:
            self.node.close()
