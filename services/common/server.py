"""gRPC server bootstrap shared by the four services.

`serve(app, config)` is the whole life of a service process:
  bind -> health NOT_SERVING -> app.start() (warm-up) -> SERVING -> wait for SIGTERM/SIGINT
  -> NOT_SERVING -> app.drain() -> server.stop(grace) -> app.close() -> return 0.
Every service gets the standard grpc.health.v1 service, server reflection (so
`grpcurl -plaintext HOST:PORT list` works without .proto files), the error-mapping
interceptor, configured message size limits and a Prometheus endpoint. With --tls-cert and
--tls-key the gRPC port serves TLS only (tls.py; `grpcurl -cacert CA.pem HOST:PORT list`),
requiring client certificates with --tls-client-ca; /metrics stays plain HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import NoReturn, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from services.common import keepalive, tls
from services.common.config import ServerConfig
from services.common.errors import LoraplexError
from services.common.metrics import start_metrics_server
from services.common.rpc import ServerInterceptor

log = logging.getLogger("loraplex.server")


class ServiceApp(Protocol):
    """What a service hands to `serve`: its servicers and its warm-up/shutdown hooks."""

    #: Full names of the gRPC services it adds, e.g. "loraplex.registry.v1.Registry".
    service_names: list[str]

    def add_to_server(self, server: grpc.aio.Server) -> None: ...

    async def start(self) -> None:
        """Warm up (open databases, load weights); the service turns SERVING after it returns."""

    async def close(self) -> None:
        """Release resources after the server has stopped taking calls."""

    # Optional: `async def drain(self) -> None`, awaited when shutdown begins, before the grace
    # period in which calls in flight finish: tell whoever sends us calls to stop (a node
    # deregisters from its router, so new requests go elsewhere instead of being refused here).


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class RunningServer:
    """A started server with its health service; `port` is the bound port."""

    def __init__(self, server: grpc.aio.Server, health: HealthServicer, names: list[str], port: int) -> None:
        self.server, self.health, self.names, self.port = server, health, names, port

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.names]:
            await self.health.set(name, status)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(app: ServiceApp, config: ServerConfig) -> RunningServer:
    """Binds and starts the server with every service NOT_SERVING."""
    limit = config.max_message_mb * 1024 * 1024
    server = grpc.aio.server(
        interceptors=[ServerInterceptor()],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
            # gRPC turns SO_REUSEPORT on by default: a second copy of a service would then
            # silently share the port. We want "address in use" instead.
            ("grpc.so_reuseport", 0),
            *keepalive.server_options(),  # our clients ping (keepalive.py)
        ],
    )
    app.add_to_server(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = list(app.service_names)
    reflection.enable_server_reflection([*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                         reflection.SERVICE_NAME], server)
    try:
        port = tls.add_port(server, config.address, config.server_tls)
    except RuntimeError:  # grpcio raises this when bind() fails
        port = 0
    if port == 0:
        raise OSError(f"cannot listen on {config.address}: address in use or not available")
    running = RunningServer(server, health, names, port)
    await running.set_serving(False)
    await server.start()
    return running


async def serve(app: ServiceApp, config: ServerConfig, service_label: str) -> int:
    """Runs a service until SIGTERM/SIGINT; returns the process exit status."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.ensure_future(stop_when_supervisor_dies(stop, service_label))
    running = await start_server(app, config)
    log.info("%s listening on %s:%d%s (NOT_SERVING while warming up)", service_label, config.host, running.port,
             "" if config.server_tls is None else " with TLS" + (
                 "" if config.server_tls.client_ca is None else ", client certificates required"))
    try:
        start_metrics_server(config.host, config.metrics_port)
    except OSError as exc:
        # Stopped here, not left to garbage collection, which ran after the loop had closed and
        # printed a traceback; the message names the port, as the gRPC port's does.
        await running.stop(0)
        raise OSError(f"cannot serve /metrics on {config.host}:{config.metrics_port}: "
                      f"{exc.strerror or exc}") from None
    warm_up = asyncio.ensure_future(app.start())
    stopped = asyncio.ensure_future(stop.wait())
    await asyncio.wait([warm_up, stopped], return_when=asyncio.FIRST_COMPLETED)
    if warm_up.done() and warm_up.exception() is not None:
        await running.stop(0)
        await app.close()
        raise warm_up.exception()  # a failed warm-up ends the process with its error
    if warm_up.done():
        await running.set_serving(True)
        log.info("%s SERVING on %s:%d", service_label, config.host, running.port)
        await stopped
    else:
        await stop_during_warm_up(warm_up, running, app, service_label)
    log.info("%s stopping: NOT_SERVING, draining for up to %.1fs", service_label, config.grace_seconds)
    drain = getattr(app, "drain", None)
    if drain is not None:
        await drain()
    await running.stop(config.grace_seconds)
    await app.close()
    watch.cancel()
    log.info("%s stopped", service_label)
    return 0


#: Set by `loraplex up` / the demo to its own pid in each service's environment.
SUPERVISOR_PID_ENV = "LORAPLEX_SUPERVISOR_PID"


async def stop_when_supervisor_dies(stop: asyncio.Event, service_label: str, poll_seconds: float = 1.0) -> None:
    """A supervised service stops as on SIGTERM once its supervisor is gone. The supervisor
    starts each service in a session of its own (a terminal's Ctrl-C reaches the supervisor,
    which stops them in order), so a supervisor killed outright (SIGKILL, the OOM killer)
    would leave them serving, holding their ports, with nobody to stop them. A dead parent's
    children are handed to another process (init or a subreaper): getppid() changes."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    if not supervisor.isdigit():
        return  # run on its own (compose, systemd): nothing to watch
    while os.getppid() == int(supervisor):
        await asyncio.sleep(poll_seconds)
    log.warning("%s: its supervisor (pid %s) is gone; stopping", service_label, supervisor)
    stop.set()


async def stop_during_warm_up(warm_up: asyncio.Future, running: RunningServer, app: ServiceApp,
                              service_label: str) -> NoReturn:
    """SIGTERM before SERVING: nothing was served, so nothing needs draining. The warm-up may be
    blocked in a thread (a database that never answers, a large checkpoint still loading) that
    cannot be interrupted, and the interpreter joins such threads at exit: the process would
    then outlive SIGTERM for as long as that thread hangs, forever for a black-holed database.
    So it leaves without waiting for them."""
    warm_up.cancel()
    log.info("%s stopping during warm-up (it was not SERVING yet)", service_label)
    await running.stop(0)
    await app.close()
    log.info("%s stopped", service_label)
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def run(app: ServiceApp, config: ServerConfig, service_label: str) -> int:
    """Process entry point: exit status 0 after a clean stop, 1 when it cannot start."""
    configure_logging(config.log_level)
    try:
        return asyncio.run(serve(app, config, service_label))
    except (OSError, LoraplexError, tls.TlsError) as exc:
        log.error("%s cannot start: %s", service_label, exc)
        return 1
    except Exception:  # noqa: BLE001 - a bug during warm-up: say so, with the traceback
        log.exception("%s cannot start", service_label)
        return 1
