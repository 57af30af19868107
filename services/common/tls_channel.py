"""Client certificates and CAs rotate without a restart: an asyncio channel that follows its
TLS files.

A service's channels live as long as the service (the router's to each node and to the
Registry, a node's to the Registry, the trainer's). gRPC reads a channel's credentials once,
so when cert-manager replaces a service's client certificate before it expires (mutual TLS),
or a CA bundle gains the CA a server's new certificate comes from, the service would go on
presenting the old certificate or trusting the old CAs on every new connection until it was
restarted: after the old certificate expires, every reconnect fails.

`RotatingChannel` stands where a `grpc.aio.Channel` does (stubs are built on it once): each
call looks at the files (a stat each, at most once per CHECK_INTERVAL_S) and, when they changed
and are valid, makes a fresh channel for this and later calls. The old channel is closed with a
grace period, so calls and streams already on it finish on it. Files that are half-written or
do not match are logged once and the last good channel kept (as servers do, tls_reload.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence

import grpc

from services.common.tls_reload import file_stamp

log = logging.getLogger("loraplex.tls")

CHECK_INTERVAL_S = 1.0
#: How long calls already on a replaced channel may go on (a generation stream, a feed watch:
#: those end, or reconnect on the new channel, well within it).
RETIRE_GRACE_S = 300.0


class RotatingChannel:
    """A grpc.aio.Channel look-alike for stubs: unary_unary ... stream_stream and close."""

    def __init__(self, make: Callable[[], grpc.aio.Channel], paths: Sequence, check: Callable[[], None]) -> None:
        """make: builds a channel from the files as they are now; check: raises if they are unusable."""
        self._make, self._paths, self._check = make, [p for p in paths if p is not None], check
        self._channel = make()
        self._stamp = file_stamp(self._paths)
        self._rejected: tuple | None = None
        self._checked_at = time.monotonic()
        self._retiring: set[asyncio.Task] = set()
        self.generation = 0  # channels replaced so far

    def current(self) -> grpc.aio.Channel:
        now = time.monotonic()
        if now - self._checked_at >= CHECK_INTERVAL_S:
            self._checked_at = now
            self._follow_files()
        return self._channel

    def _follow_files(self) -> None:
        stamp = file_stamp(self._paths)
        if stamp in (self._stamp, self._rejected):
            return
        try:
            self._check()
        except ValueError as exc:  # TlsError: logged once per bad state, not per call
            self._rejected = stamp
            log.error("client TLS files changed but cannot be used, keeping the previous ones: %s", exc)
            return
        old, self._channel = self._channel, self._make()
        self._stamp, self._rejected = stamp, None
        self.generation += 1
        log.info("client TLS files reloaded: new connections use them")
        task = asyncio.ensure_future(old.close(grace=RETIRE_GRACE_S))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # --- what stubs call ---
    def unary_unary(self, method, request_serializer=None, response_deserializer=None, **kwargs):
        return _OnCurrent(self, "unary_unary", method, request_serializer, response_deserializer, kwargs)

    def unary_stream(self, method, request_serializer=None, response_deserializer=None, **kwargs):
        return _OnCurrent(self, "unary_stream", method, request_serializer, response_deserializer, kwargs)

    def stream_unary(self, method, request_serializer=None, response_deserializer=None, **kwargs):
        return _OnCurrent(self, "stream_unary", method, request_serializer, response_deserializer, kwargs)

    def stream_stream(self, method, request_serializer=None, response_deserializer=None, **kwargs):
        return _OnCurrent(self, "stream_stream", method, request_serializer, response_deserializer, kwargs)

    async def close(self, grace: float | None = None) -> None:
        for task in list(self._retiring):
            task.cancel()
        await self._channel.close(grace)


class _OnCurrent:
    """A stub's method: each call goes out on the channel current at the time of the call."""

    def __init__(self, owner: RotatingChannel, kind: str, method, serializer, deserializer, kwargs) -> None:
        self._owner, self._kind, self._method = owner, kind, method
        self._serializer, self._deserializer, self._kwargs = serializer, deserializer, kwargs
        self._bound: tuple[grpc.aio.Channel, object] | None = None

    def __call__(self, *args, **kwargs):
        channel = self._owner.current()
        if self._bound is None or self._bound[0] is not channel:
            self._bound = (channel, getattr(channel, self._kind)(
                self._method, request_serializer=self._serializer, response_deserializer=self._deserializer,
                **self._kwargs))
        return self._bound[1](*args, **kwargs)
