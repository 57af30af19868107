"""`loraplex up` registers the base model its inference node serves.

The node serves --base-model-name, but the Router resolves only names the Registry knows and
the Trainer trains only for registered base models: without this row a fresh `loraplex up`
answered every request for its own base model "model not found" until an operator found and
called Registry/RegisterBaseModel by hand (`loraplex demo` always registered it itself).
"""

from __future__ import annotations

from pathlib import Path

import grpc

from services.common import tls
from services.common.pb.loraplex.registry.v1 import registry_pb2, registry_pb2_grpc


class RegistrationFailed(RuntimeError):
    """The Registry refused the base model (another folder under that name, say)."""


def register_base_model(registry: str, admin_token: str, name: str, folder: Path, timeout: float = 30.0,
                        client_tls: tls.ClientTls | None = None) -> str:
    """Registers `folder` as `name`; returns the location stored. Idempotent: the Registry
    answers the same name and folder again with the existing row."""
    # Absolute: the Trainer opens the location from its own working directory.
    location = str(folder.resolve())
    request = registry_pb2.RegisterBaseModelRequest(name=name, location=location,
                                                    description="registered by loraplex up")
    # A local port must never be dialled through an http_proxy from the environment.
    with tls.channel(registry, client_tls, [("grpc.enable_http_proxy", 0)]) as channel:
        try:
            reply = registry_pb2_grpc.RegistryStub(channel).RegisterBaseModel(
                request, metadata=(("authorization", f"Bearer {admin_token}"),), timeout=timeout)
        except grpc.RpcError as exc:
            hint = ""
            if exc.code() == grpc.StatusCode.ALREADY_EXISTS:
                hint = (f"; this --data-dir registered {name!r} for another checkpoint: choose another "
                        "--base-model-name or --data-dir")
            raise RegistrationFailed(f"the Registry refused base model {name!r} at {location}: "
                                     f"{exc.code().name}: {exc.details()}{hint}") from None
    return reply.location
