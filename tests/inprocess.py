"""A service app on a real gRPC server, on its own event loop in a background thread, so
synchronous tests can call it like any remote service (one helper for every service). A server
configured with TLS is dialled with `client_tls` (services.common.tls.ClientTls)."""

from __future__ import annotations

import asyncio
import threading

import grpc

from services.common import tls
from services.common.server import start_server


class InProcessServer:
    start_timeout_s = 60.0
    stop_timeout_s = 30.0
    channel_options: list[tuple[str, int]] = []

    def __init__(self, app, config, name: str, client_tls: tls.ClientTls | None = None) -> None:
        self.app, self.config, self.client_tls = app, config, client_tls
        self.address = ""
        self.loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: self.loop.run_until_complete(self._serve()),
                                        name=f"{name}-under-test", daemon=True)
        self.channel: grpc.Channel | None = None

    async def _serve(self) -> None:
        try:
            self._stop = asyncio.Event()
            running = await start_server(self.app, self.config)
            self.address = f"127.0.0.1:{running.port}"
            await self.app.start()
            await running.set_serving(True)
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stop.wait()
        await running.stop(0.5)
        await self.app.close()

    def start(self):
        self._thread.start()
        self._ready.wait(self.start_timeout_s)
        if self._error is not None:
            raise self._error
        self.channel = tls.channel(self.address, self.client_tls, self.channel_options)
        return self

    def stop(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self._stop is not None and self._thread.is_alive():
            self.loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(self.stop_timeout_s)
