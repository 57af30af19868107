"""Adapters downloaded from the Registry's DownloadAdapter stream, checked by sha256.

The manifest says how many bytes and which digest to expect; a short, long or altered
stream is refused rather than loaded. gRPC statuses become domain errors so the request
that asked for the adapter fails with the Registry's reason (NOT_FOUND stays NOT_FOUND).
"""

from __future__ import annotations

import hashlib

import grpc

from services.common import keepalive, tls
from services.common.errors import ADAPTER_CORRUPTED, REGISTRY_UNAVAILABLE, NotFound, Unavailable
from services.common.pb.loraplex.registry.v1 import registry_pb2, registry_pb2_grpc
from services.inference.adapters.sources import FetchedAdapter


class RegistrySource:
    def __init__(self, address: str, token: str, max_message_mb: int = 64,
                 client_tls: tls.ClientTls | None = None) -> None:
        self.address, self.token, self.client_tls = address, token, client_tls
        self._limit = max_message_mb * 1024 * 1024
        self._channel: grpc.aio.Channel | None = None

    def _stub(self) -> registry_pb2_grpc.RegistryStub:
        # Created on first use: an aio channel belongs to the event loop that creates it.
        if self._channel is None:
            self._channel = tls.aio_channel(self.address, self.client_tls,
                                            [("grpc.max_receive_message_length", self._limit),
                                             *keepalive.client_options()])
        return registry_pb2_grpc.RegistryStub(self._channel)

    async def fetch(self, adapter_id: str) -> FetchedAdapter:
        metadata = (("authorization", f"Bearer {self.token}"),) if self.token else ()
        # Hashed as the chunks arrive (1 MB each by default): a digest of the whole after the
        # stream ends would hold the event loop, and every stream it delivers tokens to, for
        # ~80 ms at Llama-3-8B's rank-16 size; parse_adapter takes it rather than hashing again.
        manifest, chunks, hasher = None, [], hashlib.sha256()
        try:
            async for message in self._stub().DownloadAdapter(
                    registry_pb2.DownloadAdapterRequest(id=adapter_id), metadata=metadata, timeout=300):
                if message.HasField("manifest"):
                    manifest = message.manifest
                else:
                    chunks.append(message.chunk)
                    hasher.update(message.chunk)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound(f"adapter {adapter_id!r} not found in the registry") from exc
            raise Unavailable(f"registry {self.address} failed to send adapter {adapter_id}: "
                              f"{exc.code().name} {exc.details()}", reason=REGISTRY_UNAVAILABLE) from exc
        # Neither is the caller's fault (a 400 told it to change its request) nor this node's
        # (the router would take it out of service): UNAVAILABLE with a reason that says the
        # adapter's source failed, so the router tries a node that may hold the adapter already.
        if manifest is None:
            raise Unavailable(f"registry {self.address} sent no manifest for adapter {adapter_id}",
                              reason=REGISTRY_UNAVAILABLE)
        weights, digest = b"".join(chunks), hasher.hexdigest()
        if len(weights) != manifest.size_bytes or digest != manifest.sha256:
            raise Unavailable(f"adapter {adapter_id} arrived corrupted: {len(weights)} bytes with sha256 "
                              f"{digest}, expected {manifest.size_bytes} bytes with {manifest.sha256}",
                              reason=ADAPTER_CORRUPTED)
        return FetchedAdapter(adapter_id, manifest.config_json, weights, manifest.sha256, sha256=digest)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
