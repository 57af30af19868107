"""`python -m services.common.healthcheck HOST:PORT [--service NAME] [--timeout S]`

Asks a server's grpc.health.v1 service for its status, prints one line and exits 0 when it
is SERVING, 1 otherwise. Compose health checks run it inside the containers (the image has
no grpc_health_probe), so this module imports only grpc: a probe that pulled in torch (as
services.common.stack does, through the tiny model builder) would take seconds of CPU every
interval.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

UNREACHABLE = "UNREACHABLE"
SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


def health_status(address: str, timeout: float = 1.0, service: str = "") -> str:
    """SERVING / NOT_SERVING / ... of `service` ("" = the whole server), SERVICE_UNKNOWN when
    the server does not know that name, or UNREACHABLE."""
    # A probe of a local port must never be sent through an http_proxy from the environment.
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(address, options=options) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return SERVICE_UNKNOWN if exc.code() == grpc.StatusCode.NOT_FOUND else UNREACHABLE
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def main(argv: list[str] | None = None, prog: str = "python -m services.common.healthcheck") -> int:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Exit 0 when a gRPC server reports SERVING, 1 otherwise.")
    parser.add_argument("address", help="HOST:PORT of the gRPC server")
    parser.add_argument("--service", default="", help="fully qualified service name (default: the whole server)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    status = health_status(args.address, args.timeout, args.service)
    print(f"{args.address} {args.service or '(server)'}: {status}", flush=True)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
