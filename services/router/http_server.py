"""Runs an ASGI app with uvicorn inside the router's asyncio loop, next to the gRPC server.

One loop for both means the HTTP API and gRPC share the router's state (caches, quotas,
node loads) without locks. We bind the socket ourselves, so a taken port fails start-up
with a clear OSError (uvicorn would call sys.exit inside our loop), and we leave signal
handling to services/common/server.py, which stops both servers in order. Given the service's
TLS settings it serves HTTPS with the gRPC port's certificate (no client certificates: callers
of the OpenAI API authenticate with their API key), and follows that certificate's files when
they are replaced (tls_reload.py), checking every RELOAD_CHECK_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from services.common.tls import ServerTls
from services.common.tls_reload import WatchedCertificates

log = logging.getLogger("loraplex.router.http")

#: How often the HTTPS API looks at its certificate files (gRPC looks at each handshake).
RELOAD_CHECK_S = 2.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the process's SIGTERM handling belongs to serve(); see module docstring


class HttpServer:
    def __init__(self, app, host: str, port: int, grace_s: float, log_level: str = "warning",
                 tls: ServerTls | None = None) -> None:
        self.host, self.requested_port = host, port
        self.scheme = "http" if tls is None else "https"
        files = {} if tls is None else {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        self._config = uvicorn.Config(app, lifespan="off", access_log=False, log_config=None,
                                      log_level=log_level.lower(), timeout_graceful_shutdown=max(grace_s, 0.1),
                                      **files)
        self._server = _EmbeddedServer(self._config)
        self._certificates = None if tls is None else WatchedCertificates(tls.cert, tls.key)
        self._reloader: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._socket: socket.socket | None = None
        self.port = 0

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.requested_port} for the HTTP API: {exc.strerror}") \
                from None
        sock.listen(2048)
        sock.setblocking(False)
        self._socket, self.port = sock, sock.getsockname()[1]
        self._task = asyncio.ensure_future(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise OSError(f"the HTTP API on {self.host}:{self.port} stopped during start-up")
            await asyncio.sleep(0.01)
        if self._certificates is not None:
            self._reloader = asyncio.ensure_future(self._follow_certificate_files())

    async def _follow_certificate_files(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_CHECK_S)
            try:
                # Reading and checking the files is blocking file and crypto work: off the loop.
                fresh = await asyncio.to_thread(self._certificates.refresh, True)
                if fresh is not None:
                    self._certificates.load_into(self._config.ssl, fresh)
            except Exception:  # never let one bad check stop the watching
                log.exception("reloading the HTTPS certificate failed; serving the previous one")

    async def stop(self) -> None:
        if self._reloader is not None:
            self._reloader.cancel()
            self._reloader = None
        if self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
