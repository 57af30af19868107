"""gRPC client of one inference node; turns statuses into NodeFailure (see nodes.py).

One channel per node, kept for the router's lifetime: HTTP/2 multiplexes every concurrent
stream over it, and gRPC reconnects it by itself after the node comes back. Streams are
pulled one message at a time, so a slow client slows the node's stream through HTTP/2 flow
control instead of filling the router's memory (backpressure end to end).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import errors, keepalive, tls
from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.rpc import STATUS_OF, error_info
from services.router.nodes import NodeFailure, NodeStats

RECONNECT_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                     ("grpc.max_reconnect_backoff_ms", 2000)]
ERROR_OF = {code: cls for cls, code in STATUS_OF.items()}
#: The request's own fault: every node would answer the same.
FINAL = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION,
         grpc.StatusCode.OUT_OF_RANGE}
#: The node is gone or not serving: stop placing on it until its health check passes.
DOWN = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def failure_of(exc: grpc.aio.AioRpcError, address: str) -> NodeFailure:
    code, info = exc.code(), error_info(exc)
    if code in FINAL:  # keep the node's field and figures (prompt_tokens, max_context, ...) for the caller
        metadata = {k: v for k, v in (info.metadata.items() if info else ()) if k not in ("reason", "message")}
        return NodeFailure(ERROR_OF[code](exc.details() or code.name, reason="NODE_REJECTED", **metadata),
                           retryable=False)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in (exc.details() or ""):
        # gRPC's own size check (this router's send limit or the node's receive limit), not a busy
        # node: every node and every retry would refuse the same request alike.
        return NodeFailure(errors.InvalidArgument(
            f"the request is too large to pass on to inference node {address} ({exc.details()}); send a "
            "shorter prompt", reason="REQUEST_TOO_LARGE", field="prompt"), retryable=False)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return NodeFailure(errors.ResourceExhausted(f"inference node {address}: {exc.details()}",
                                                    reason="NODE_QUEUE_FULL"), retryable=True)
    if code == grpc.StatusCode.UNAVAILABLE and info is not None and info.reason in errors.DEPENDENCY_REASONS:
        # The node is fine, the adapter's source is not: another node may hold it already.
        return NodeFailure(errors.Unavailable(f"inference node {address} could not load the adapter: {exc.details()}",
                                              reason=info.reason, node=address), retryable=True)
    return NodeFailure(errors.Unavailable(f"inference node {address} failed: {code.name}: {exc.details()}",
                                          reason="NODE_FAILED", node=address),
                       retryable=True, node_down=code in DOWN,
                       timed_out=code == grpc.StatusCode.DEADLINE_EXCEEDED)


class GrpcNodeClient:
    def __init__(self, address: str, admin_token: str = "", max_message_mb: int = 64,
                 client_tls: tls.ClientTls | None = None) -> None:
        self.address = address
        limit = max_message_mb * 1024 * 1024
        # Created inside the running loop (an aio channel belongs to its loop). gRPC's default
        # reconnect backoff grows to 2 minutes; a node that comes back should be found by the
        # next health poll, so it is capped at a few seconds.
        self._channel = tls.aio_channel(address, client_tls, [
            ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
            *RECONNECT_OPTIONS, *keepalive.client_options()])
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        self._metadata = (("authorization", f"Bearer {admin_token}"),) if admin_token else ()

    async def stats(self, timeout_s: float) -> NodeStats:
        """Load and residency; NodeFailure when unreachable or not SERVING (loading, draining)."""
        try:
            health = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                raise NodeFailure(errors.Unavailable(f"inference node {self.address} is not serving (loading or "
                                                     "shutting down)", reason="NODE_NOT_SERVING"),
                                  retryable=True, node_down=True)
            reply = await self._stub.GetStats(inference_pb2.GetStatsRequest(), metadata=self._metadata,
                                              timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise failure_of(exc, self.address) from None
        return NodeStats(running_requests=reply.running_requests, waiting_requests=reply.waiting_requests,
                         kv_blocks_used=reply.kv_blocks_used, kv_blocks_total=reply.kv_blocks_total,
                         adapter_pages_used=reply.pool.pages_used, adapter_pages_total=reply.pool.pages_total,
                         resident_adapter_ids=tuple(reply.resident_adapter_ids))

    async def base_model(self, timeout_s: float) -> str:
        try:
            info = await self._stub.GetInfo(inference_pb2.GetInfoRequest(), metadata=self._metadata,
                                            timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise failure_of(exc, self.address) from None
        return info.base_model

    async def prefetch_adapter(self, adapter_id: str, sha256: str, timeout_s: float) -> str:
        request = inference_pb2.LoadAdapterRequest(adapter_id=adapter_id, sha256=sha256, host_only=True)
        try:
            slot = await self._stub.LoadAdapter(request, metadata=self._metadata, timeout=timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise failure_of(exc, self.address) from None
        return inference_pb2.AdapterTier.Name(slot.tier).removeprefix("ADAPTER_TIER_")

    async def generate(self, request: inference_pb2.GenerateRequest) -> AsyncIterator[generation_pb2.GenerationDelta]:
        call = self._stub.Generate(request, metadata=self._metadata)
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    return
                yield message.delta
        except grpc.aio.AioRpcError as exc:
            raise failure_of(exc, self.address) from None
        finally:
            # Leaving early (client cancel, error, router stop) must cancel on the node, which
            # frees the request's KV blocks there; a finished call ignores this.
            call.cancel()

    async def close(self) -> None:
        await self._channel.close()
