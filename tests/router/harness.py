"""Real parts for router tests: a Registry in-process, inference node processes, a Router
in-process (tests/inprocess.InProcessServer),
and small clients that speak to them with a bearer token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls
from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.pb.loraplex.router.v1 import nodes_pb2, nodes_pb2_grpc, router_pb2_grpc
from services.router.app import RouterApp
from services.router.config import RouterConfig
from services.router.node_agent import NodeAgent
from services.router.nodes import NodeStats
from tests.conftest import free_port, start_module
from tests.inprocess import InProcessServer
from tests.registry.client import bearer

ADMIN_TOKEN = "router-test-admin"


class InProcessRouter(InProcessServer):
    """A RouterApp on a real gRPC server and HTTP port, on its own loop in a thread."""

    def __init__(self, config: RouterConfig, client_tls=None) -> None:
        super().__init__(RouterApp(config), config, "router", client_tls)

    @property
    def stub(self) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel)

    @property
    def nodes_stub(self) -> nodes_pb2_grpc.NodesStub:
        return nodes_pb2_grpc.NodesStub(self.channel)

    @property
    def base_url(self) -> str:
        return f"{self.app.http.scheme}://127.0.0.1:{self.app.http.port}/v1"

    def run(self, fn: Callable[[], object]) -> object:
        """Runs fn on the router's loop (to read its state safely) and returns its result."""
        async def call():
            return fn()
        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(10)

    def wait_feed_live(self, timeout: float = 30) -> None:
        wait_until(lambda: self.run(lambda: self.app.core.authenticator.cache.feed.live), timeout,
                   "the router's change feed never connected")

    def wait_healthy(self, count: int, timeout: float = 60) -> None:
        wait_until(lambda: self.run(lambda: len(self.app.membership.placeable())) >= count, timeout,
                   f"fewer than {count} healthy nodes")



def router_config(nodes: list[str], registry_address: str, **overrides) -> RouterConfig:
    settings = dict(port=0, metrics_port=0, http_port=0, registry_address=registry_address,
                    admin_token=ADMIN_TOKEN, node=nodes, node_poll_seconds=0.2, heartbeat_interval_seconds=0.3,
                    auth_cache_seconds=600, resolve_cache_seconds=600, grace_seconds=1, log_level="WARNING")
    settings.update(overrides)
    return RouterConfig(**settings)


class NodeProcess:
    """`python -m services.inference` downloading adapters from the registry."""

    def __init__(self, model_dir: Path, registry_address: str, log: Path, port: int = 0,
                 base_model_name: str = "tiny", *extra: str, env: dict[str, str] | None = None,
                 client_tls=None) -> None:
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.process = start_module(
            "services.inference", "--port", str(self.port), "--metrics-port", "0", "--base-model", str(model_dir),
            "--base-model-name", base_model_name, "--registry-address", registry_address, "--admin-token", ADMIN_TOKEN,
            "--kv-cache-mb", "4", "--adapter-pool-pages", "128", "--grace-seconds", "1", *extra, log=log, env=env)
        self.log = log
        self.channel = tls.channel(self.address, client_tls)
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {ADMIN_TOKEN}"),)  # the node takes no call without it

    def stats(self) -> inference_pb2.Stats:
        return self.stub.GetStats(inference_pb2.GetStatsRequest(), metadata=self.metadata, timeout=10)

    def close(self) -> None:
        self.channel.close()


def wait_until(predicate: Callable[[], object], timeout: float = 30, what: str = "condition") -> None:
    """Polls for an eventual effect (never a timing assertion: the deadline only bounds a hang)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"not reached within {timeout}s: {what}")


def node_entry(router: InProcessRouter, node_id: str) -> nodes_pb2.NodeStatus | None:
    """The router's ListNodes entry for the node, or None."""
    listed = router.nodes_stub.ListNodes(nodes_pb2.ListNodesRequest(), metadata=bearer(ADMIN_TOKEN), timeout=10)
    return next((n for n in listed.nodes if n.node_id == node_id), None)


def node_health(router: InProcessRouter, node_id: str) -> int | None:
    found = node_entry(router, node_id)
    return None if found is None else found.health


def start_agent(router: InProcessRouter, node_id: str, address: str) -> tuple[NodeAgent, object]:
    """A NodeAgent registering `address` and heartbeating an idle load, on the router's loop
    (it is not the node process: freezing the node does not stop its heartbeats, cancelling
    the returned future does). Returns (agent, its running future)."""
    async def stats() -> NodeStats:
        return NodeStats()

    agent = router.run(lambda: NodeAgent(router.address, ADMIN_TOKEN, node_id, address, "tiny", stats))
    return agent, asyncio.run_coroutine_threadsafe(agent.run(), router.loop)


def stop_agent(router: InProcessRouter, agent: NodeAgent, beating) -> None:
    """Stops heartbeating and deregisters."""
    beating.cancel()
    asyncio.run_coroutine_threadsafe(agent.stop(), router.loop).result(10)


class HeldNode(inference_pb2_grpc.InferenceServicer, health_pb2_grpc.HealthServicer):
    """A real gRPC inference node (base model "tiny") whose every generation sends two tokens (or
    `tokens_before_hold`) and then holds the stream open, as a long generation does, until
    `finish` releases it with a final token or the router cancels the call; `freeze` makes it
    stop answering anything, health checks included (a hung host: the connection stays up,
    nothing comes back); with `serving` False its health check answers NOT_SERVING (a node
    draining its streams). Served on the router's loop, so its counters are read with `router.run`."""

    def __init__(self, tokens_before_hold: int = 2) -> None:
        self.tokens_before_hold = tokens_before_hold
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.started = 0  # Generate calls received
        self.cancelled = 0  # Generate calls the router cancelled
        self.serving = True
        self._frozen: asyncio.Event | None = None
        self._finish: asyncio.Event | None = None
        self._server: grpc.aio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def serve(self, router: InProcessRouter) -> None:
        async def start() -> None:
            self._frozen, self._finish = asyncio.Event(), asyncio.Event()
            self._server = grpc.aio.server()
            inference_pb2_grpc.add_InferenceServicer_to_server(self, self._server)
            health_pb2_grpc.add_HealthServicer_to_server(self, self._server)
            self._server.add_insecure_port(self.address)
            await self._server.start()

        self._loop = router.loop
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(10)

    def freeze(self) -> None:
        self._loop.call_soon_threadsafe(self._frozen.set)

    def finish(self) -> None:
        self._loop.call_soon_threadsafe(self._finish.set)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(10)

    async def _answer_unless_frozen(self) -> None:
        if self._frozen.is_set():
            await asyncio.Event().wait()  # never answers; the caller's deadline ends the call

    async def Check(self, request, context):
        await self._answer_unless_frozen()
        status = health_pb2.HealthCheckResponse.SERVING if self.serving else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    async def GetInfo(self, request, context):
        await self._answer_unless_frozen()
        return inference_pb2.ModelInfo(base_model="tiny")

    async def GetStats(self, request, context):
        await self._answer_unless_frozen()
        return inference_pb2.Stats()

    async def Generate(self, request, context):
        self.started += 1
        try:
            for i in range(self.tokens_before_hold):
                yield inference_pb2.GenerateResponse(delta=generation_pb2.GenerationDelta(
                    text=f"t{i}", token_ids=[i], prompt_tokens=1 if i == 0 else 0))
            await self._finish.wait()
            final = generation_pb2.GenerationDelta(text="t2", token_ids=[2],
                                                   finish_reason=generation_pb2.FINISH_REASON_LENGTH)
            final.usage.prompt_tokens, final.usage.completion_tokens = 1, 3
            yield inference_pb2.GenerateResponse(delta=final)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
