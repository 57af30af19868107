"""Router and Nodes gRPC servicers: protobuf in -> RouterCore / Membership -> protobuf out.

Statuses (domain errors mapped by services/common/rpc.py): Router RPCs answer
UNAUTHENTICATED (missing/invalid/revoked key, also mid-stream when the key is revoked or
expires or its tenant is deleted: open_streams.py), NOT_FOUND (unknown model, or another tenant's),
INVALID_ARGUMENT, RESOURCE_EXHAUSTED with RetryInfo (tenant quota, or every node's queue
full), UNAVAILABLE (no healthy node, registry unreachable, node lost or silent after the
first token). Nodes RPCs need the admin token: UNAUTHENTICATED without one,
PERMISSION_DENIED with any other token (or when the router has no admin token at all).
"""

from __future__ import annotations

import hmac

from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import PermissionDenied, Unavailable
from services.common.pb.loraplex.router.v1 import nodes_pb2, nodes_pb2_grpc, router_pb2, router_pb2_grpc
from services.common.auth import authorization_of, bearer_token
from services.router.membership import Health, Membership
from services.router.nodes import NodeStats
from services.router.proxy import GenerateCall, RouterCore


def call_from(request: router_pb2.GenerateRequest) -> GenerateCall:
    kind = request.WhichOneof("input")
    return GenerateCall(model=request.model, prompt=request.prompt if kind == "prompt" else None,
                        messages=request.messages if kind == "messages" else None, sampling=request.sampling,
                        request_id=request.request_id)


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


class RouterServicer(router_pb2_grpc.RouterServicer):
    """Registered before the app has started; answers UNAVAILABLE until `attach`."""

    def __init__(self) -> None:
        self._core: RouterCore | None = None

    def attach(self, core: RouterCore) -> None:
        self._core = core

    @property
    def core(self) -> RouterCore:
        if self._core is None:
            raise Unavailable("the router is starting; retry shortly", reason="STARTING")
        return self._core

    async def Generate(self, request, context):
        caller = await self.core.authenticate(authorization_of(context))
        stream = await self.core.open(caller, call_from(request))
        try:
            first = True
            async for delta in stream:
                if first:
                    yield router_pb2.GenerateResponse(delta=delta, request_id=stream.request_id,
                                                      adapter_id=stream.target.adapter_id)
                    first = False
                else:
                    yield router_pb2.GenerateResponse(delta=delta)
        finally:
            await stream.aclose()

    async def Complete(self, request, context):
        caller = await self.core.authenticate(authorization_of(context))
        done = await self.core.complete(caller, call_from(request))
        return router_pb2.CompleteResponse(
            request_id=done.request_id, model=done.target.model, adapter_id=done.target.adapter_id, text=done.text,
            token_ids=done.token_ids, logprobs=done.logprobs, finish_reason=done.finish_reason, usage=done.usage,
            matched_stop=done.matched_stop)

    async def ListModels(self, request, context):
        caller = await self.core.authenticate(authorization_of(context))
        models = await self.core.list_models(caller)
        return router_pb2.ListModelsResponse(models=[
            router_pb2.Model(name=m.name, base_model=m.base_model, adapter_name=m.adapter_name,
                             adapter_version=m.adapter_version, created_at=_timestamp(m.created_at))
            for m in models])


HEALTH = {Health.HEALTHY: nodes_pb2.NODE_HEALTH_HEALTHY, Health.UNHEALTHY: nodes_pb2.NODE_HEALTH_UNHEALTHY,
          Health.DRAINING: nodes_pb2.NODE_HEALTH_DRAINING}


class NodesServicer(nodes_pb2_grpc.NodesServicer):
    def __init__(self, admin_token: str) -> None:
        self.admin_token = admin_token
        self._membership: Membership | None = None

    def attach(self, membership: Membership) -> None:
        self._membership = membership

    @property
    def membership(self) -> Membership:
        if self._membership is None:
            raise Unavailable("the router is starting; retry shortly", reason="STARTING")
        return self._membership

    def _require_admin(self, context) -> None:
        token = bearer_token(authorization_of(context))
        if not self.admin_token or not hmac.compare_digest(token.encode(), self.admin_token.encode()):
            raise PermissionDenied("the Nodes service needs the router's admin token", reason="ADMIN_ONLY")

    async def RegisterNode(self, request, context):
        self._require_admin(context)
        interval = self.membership.register(request.node_id, request.address, request.base_model)
        return nodes_pb2.RegisterNodeResponse(heartbeat_interval_ms=int(interval * 1000))

    async def Heartbeat(self, request, context):
        self._require_admin(context)
        load = request.load
        self.membership.heartbeat(request.node_id, NodeStats(
            running_requests=load.running_requests, waiting_requests=load.waiting_requests,
            kv_blocks_used=load.kv_blocks_used, kv_blocks_total=load.kv_blocks_total,
            adapter_pages_used=load.adapter_pages_used, adapter_pages_total=load.adapter_pages_total,
            resident_adapter_ids=tuple(request.resident_adapter_ids)))
        return nodes_pb2.HeartbeatResponse()

    async def DeregisterNode(self, request, context):
        self._require_admin(context)
        self.membership.deregister(request.node_id)
        return nodes_pb2.DeregisterNodeResponse()

    async def ListNodes(self, request, context):
        self._require_admin(context)
        return nodes_pb2.ListNodesResponse(nodes=[
            nodes_pb2.NodeStatus(
                node_id=n.node_id, address=n.address, base_model=n.base_model, health=HEALTH[n.health],
                load=nodes_pb2.NodeLoad(
                    running_requests=n.stats.running_requests, waiting_requests=n.stats.waiting_requests,
                    kv_blocks_used=n.stats.kv_blocks_used, kv_blocks_total=n.stats.kv_blocks_total,
                    adapter_pages_used=n.stats.adapter_pages_used, adapter_pages_total=n.stats.adapter_pages_total),
                resident_adapter_ids=sorted(n.stats.resident_adapter_ids),
                last_seen=_timestamp(n.last_seen) if n.last_seen else None, is_static=n.is_static)
            for n in sorted(self.membership.nodes.values(), key=lambda n: n.node_id)])
