"""`python -m services.common.healthcheck HOST:PORT [--service NAME] [--timeout S] [TLS flags]`

Asks a server's grpc.health.v1 service for its status, prints one line and exits 0 when it
is SERVING, 1 otherwise. Compose health checks run it inside the containers (the image has
no grpc_health_probe), so this module imports only grpc (and services.common.tls, which
imports nothing else): a probe that pulled in torch (as services.common.stack does, through
the tiny model builder) would take seconds of CPU every interval.

A server started with --tls-cert is probed over TLS with --tls-ca (and, under mutual TLS,
--tls-client-cert/--tls-client-key); each defaults to its LORAPLEX_* variable, so a probe in
a container configured through the environment uses the service's own settings.
--tls-server-name checks the certificate for that name instead of the host dialled (probing
127.0.0.1 inside a container whose certificate names the service).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import tls

UNREACHABLE = "UNREACHABLE"
SERVICE_UNKNOWN = "SERVICE_UNKNOWN"


def health_status(address: str, timeout: float = 1.0, service: str = "",
                  client_tls: tls.ClientTls | None = None) -> str:
    """SERVING / NOT_SERVING / ... of `service` ("" = the whole server), SERVICE_UNKNOWN when
    the server does not know that name, or UNREACHABLE (also a TLS server probed in clear text,
    or one whose certificate the probe does not trust)."""
    # A probe of a local port must never be sent through an http_proxy from the environment.
    options = [("grpc.enable_http_proxy", 0)]
    with tls.channel(address, client_tls, options) as channel:
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
    for flag, text in (("--tls-ca", "PEM CA bundle verifying the server: probe over TLS"),
                       ("--tls-client-cert", "PEM client certificate, for a server requiring one"),
                       ("--tls-client-key", "PEM private key of --tls-client-cert")):
        env = "LORAPLEX_" + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, type=Path, default=Path(os.environ[env]) if os.environ.get(env) else None,
                            help=f"{text} [env {env}]")
    parser.add_argument("--tls-server-name", default="", help="name checked against the server's certificate "
                                                              "instead of the host in ADDRESS")
    args = parser.parse_args(argv)
    try:
        client_tls = tls.client_tls(args.tls_ca, args.tls_client_cert, args.tls_client_key, args.tls_server_name)
    except tls.TlsError as exc:
        parser.error(str(exc))
    status = health_status(args.address, args.timeout, args.service, client_tls)
    print(f"{args.address} {args.service or '(server)'}: {status}", flush=True)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
