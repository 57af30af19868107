"""The Router process: config -> Registry client, caches, change feed, node membership,
quotas, RouterCore -> gRPC servicers (Router, Nodes) and the OpenAI HTTP API (with the
Files and Fine-tuning API when a Trainer is configured).

Start-up does not wait for the Registry or any node: the router turns SERVING at once and
answers UNAVAILABLE (with the reason) until they are reachable, so `loraplex up` and
orchestrators can start services in any order. Background tasks: the change-feed watcher
(feed.py), the node poller (membership.py) and the adapter prefetch workers (prefetch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import grpc

from services.common.pb.loraplex.router.v1 import nodes_pb2_grpc, router_pb2_grpc
from services.common.services import NODES, ROUTER
from services.router.auth import Authenticator
from services.common.feed_cache import FeedState
from services.router.config import RouterConfig
from services.router.feed import ChangeFeedWatcher, FeedEvent
from services.router.http_api import build_app
from services.router.http_server import HttpServer
from services.router.membership import Membership
from services.router.node_client import GrpcNodeClient
from services.router.open_streams import OpenStreams
from services.router.openai_files import FilesApi
from services.router.openai_fine_tuning import FineTuningApi
from services.router.openai_fine_tuning_api import FineTuningBackend, routes as fine_tuning_routes
from services.router.prefetch import AdapterPrefetcher
from services.router.proxy import RouterCore
from services.router.quotas import Limits, QuotaManager
from services.router.registry_client import RegistryClient
from services.router.resolution import Resolver
from services.router.servicer import NodesServicer, RouterServicer
from services.router.trainer_client import TrainerClient

log = logging.getLogger("loraplex.router")


class RouterApp:
    service_names = [ROUTER.full_name, NODES.full_name]

    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self._router = RouterServicer()
        self._nodes = NodesServicer(config.admin_token)
        self.core: RouterCore | None = None
        self.membership: Membership | None = None
        self.http: HttpServer | None = None
        self.watcher: ChangeFeedWatcher | None = None
        self.prefetcher: AdapterPrefetcher | None = None
        self._registry: RegistryClient | None = None
        self._trainer: TrainerClient | None = None
        self._tasks: list[asyncio.Task] = []

    def add_to_server(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(self._router, server)
        nodes_pb2_grpc.add_NodesServicer_to_server(self._nodes, server)

    async def start(self) -> None:
        config = self.config
        feed = FeedState()
        self._registry = registry = RegistryClient(config.registry_address, config.admin_token,
                                                   config.registry_timeout_seconds, config.max_message_mb,
                                                   config.client_tls)
        authenticator = Authenticator(registry, config.auth_cache_seconds, feed)
        resolver = Resolver(registry, config.resolve_cache_seconds, feed)
        self.membership = membership = Membership(
            lambda address: GrpcNodeClient(address, config.admin_token, config.max_message_mb, config.client_tls),
            config.node_poll_seconds, config.node_timeout_seconds, config.heartbeat_interval_seconds,
            slow_polls=config.node_slow_polls)
        for address in config.node:
            membership.add_static(address)
        quotas = QuotaManager(Limits(config.tenant_max_concurrent, config.tenant_tokens_per_minute),
                              [(o.tenant, Limits(o.max_concurrent, o.tokens_per_minute))
                               for o in config.quota_overrides])
        open_streams = OpenStreams()
        if config.prefetch_adapters:
            self.prefetcher = AdapterPrefetcher(registry, membership)
            membership.on_healthy.append(self.prefetcher.node_healthy)  # warms a node that joins
        prefetcher = self.prefetcher
        self.core = RouterCore(authenticator, resolver, membership, quotas, config.load_balance_factor,
                               config.max_attempts, open_streams,
                               prefetcher.recent if prefetcher is not None else None)
        self._router.attach(self.core)
        self._nodes.attach(membership)

        def apply(event: FeedEvent) -> None:
            # Revocations also end the requests in flight; unbinds and deletions do not (open_streams.py).
            if event.kind == "API_KEY_REVOKED":
                authenticator.key_revoked(event.subject)
                open_streams.key_revoked(event.tenant_id, event.subject)
            elif event.kind == "TENANT_DELETED":
                authenticator.tenant_deleted(event.tenant_id)
                resolver.adapters_changed(event.tenant_id)
                open_streams.tenant_deleted(event.tenant_id)
            elif event.kind in ("DEPLOYMENT_BOUND", "DEPLOYMENT_UNBOUND"):
                resolver.deployment_changed(event.tenant_id, event.subject)
            elif event.kind in ("ADAPTER_CREATED", "ADAPTER_DELETED"):
                resolver.adapters_changed(event.tenant_id)
            elif event.kind == "BASE_MODEL_REGISTERED":
                resolver.base_model_registered(event.subject)
            if prefetcher is not None:  # after the caches: it only enqueues (binds, new versions)
                prefetcher.apply(event)

        def reset() -> None:  # ends no stream: nothing is known to be revoked (open_streams.py)
            authenticator.clear()
            resolver.clear()

        self.watcher = ChangeFeedWatcher(registry, apply, reset, feed)
        self._tasks = [asyncio.ensure_future(self.watcher.run()), asyncio.ensure_future(membership.run()),
                       *(prefetcher.workers() if prefetcher is not None else ())]
        if config.http_enabled:
            more_routes = fine_tuning_routes(self.core, self._fine_tuning_backend(self.core))
            self.http = HttpServer(build_app(self.core, config.max_message_mb * 2**20, more_routes), config.host,
                                   config.http_port, config.grace_seconds, config.log_level, config.server_tls)
            await self.http.start()
            log.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", self.http.scheme, config.host, self.http.port)

    def _fine_tuning_backend(self, core: RouterCore) -> FineTuningBackend | None:
        """The Files and Fine-tuning API's Trainer calls; None without --trainer-address (501s)."""
        config = self.config
        if not config.fine_tuning_enabled:
            return None
        self._trainer = trainer = TrainerClient(config.trainer_address, config.trainer_timeout_seconds,
                                                config.max_message_mb, config.client_tls)

        async def base_models(caller) -> list[str]:
            return [entry.name for entry in await core.list_models(caller) if not entry.adapter_name]

        return FineTuningBackend(FilesApi(trainer, base_models), FineTuningApi(trainer, core.resolve),
                                 config.max_upload_mb * 2**20, config.max_message_mb * 2**20)

    async def close(self) -> None:
        if self.http is not None:
            await self.http.stop()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.membership is not None:
            await self.membership.close()
        if self._registry is not None:
            await self._registry.close()
        if self._trainer is not None:
            await self._trainer.close()
