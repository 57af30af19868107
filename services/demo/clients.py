"""Where the four services are, and authenticated gRPC stubs for them."""

from __future__ import annotations

import dataclasses

import grpc

from services.common import tls
from services.common.pb.loraplex.inference.v1 import inference_pb2_grpc
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.pb.loraplex.router.v1 import nodes_pb2_grpc, router_pb2_grpc
from services.common.pb.loraplex.trainer.v1 import trainer_pb2_grpc


@dataclasses.dataclass(frozen=True)
class Endpoints:
    registry: str
    trainer: str
    router: str
    openai_base_url: str
    admin_token: str
    # What a user on another machine should dial (compose: the published ports, not service names).
    public_router: str = ""
    public_openai_base_url: str = ""
    #: How the demo's gRPC and HTTPS calls verify the services (None: clear text).
    client_tls: tls.ClientTls | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "public_router", self.public_router or self.router)
        object.__setattr__(self, "public_openai_base_url", self.public_openai_base_url or self.openai_base_url)


class Authorized:
    """A stub whose every call carries `authorization: Bearer <token>` and a deadline."""

    def __init__(self, stub, token: str, timeout: float = 60.0) -> None:
        self._stub, self._metadata, self._timeout = stub, (("authorization", f"Bearer {token}"),), timeout

    def __getattr__(self, rpc: str):
        method = getattr(self._stub, rpc)

        def call(request, timeout: float | None = None):
            return method(request, metadata=self._metadata, timeout=timeout or self._timeout)

        return call


class Channels:
    """One channel per service for the whole demo (gRPC channels are meant to be shared)."""

    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._channels: dict[str, grpc.Channel] = {}

    def channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = tls.channel(address, self.endpoints.client_tls)
        return self._channels[address]

    def registry(self, token: str) -> Authorized:
        return Authorized(registry_pb2_grpc.RegistryStub(self.channel(self.endpoints.registry)), token)

    def trainer(self, token: str) -> Authorized:
        return Authorized(trainer_pb2_grpc.TrainerStub(self.channel(self.endpoints.trainer)), token)

    def router(self, token: str) -> Authorized:
        return Authorized(router_pb2_grpc.RouterStub(self.channel(self.endpoints.router)), token)

    def nodes(self) -> Authorized:
        return Authorized(nodes_pb2_grpc.NodesStub(self.channel(self.endpoints.router)), self.endpoints.admin_token)

    def inference(self, address: str) -> Authorized:
        return Authorized(inference_pb2_grpc.InferenceStub(self.channel(address)), self.endpoints.admin_token)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
