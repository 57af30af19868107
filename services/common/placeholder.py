"""Servicers for RPCs whose issue has not landed yet: they answer UNIMPLEMENTED, honestly.

A service module lists its gRPC services with the issue that will implement them; the
placeholder answers every RPC of those services with UNIMPLEMENTED and a message that says
so. As an issue lands, its real servicer replaces the placeholder.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from services.common.errors import Unimplemented


@dataclass(frozen=True)
class GrpcService:
    """A generated service: its descriptor, servicer base class and registration function."""

    descriptor: ServiceDescriptor
    servicer_base: type
    add_to_server: Callable[[Any, grpc.aio.Server], None]

    @property
    def full_name(self) -> str:
        return self.descriptor.full_name


def _unary(message: str):
    async def method(self, request, context):
        raise Unimplemented(message)

    return method


def _streaming(message: str):
    async def method(self, request, context):
        raise Unimplemented(message)
        yield  # pragma: no cover - makes this an async generator, as streaming handlers are

    return method


def unimplemented_servicer(service: GrpcService, lands_with: str) -> Any:
    """An instance of the service's servicer whose every RPC answers UNIMPLEMENTED."""
    methods = {}
    for rpc in service.descriptor.methods:
        message = f"{service.full_name}/{rpc.name} is not implemented yet ({lands_with})"
        methods[rpc.name] = (_streaming if rpc.server_streaming else _unary)(message)
    cls = type(f"Unimplemented{service.descriptor.name}", (service.servicer_base,), methods)
    return cls()


class PlaceholderApp:
    """A ServiceApp (see services/common/server.py) made of not-yet-implemented services."""

    def __init__(self, services: list[tuple[GrpcService, str]]) -> None:
        self._services = services
        self.service_names = [service.full_name for service, _ in services]

    def add_to_server(self, server: grpc.aio.Server) -> None:
        for service, lands_with in self._services:
            service.add_to_server(unimplemented_servicer(service, lands_with), server)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
