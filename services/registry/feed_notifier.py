"""Wakes local WatchChanges streams as soon as this process commits a change.

Commits happen on worker threads; watchers live on the event loop. `notify` may be called
from any thread. Watchers take a `ticket` *before* reading the database and wait on it
after, so a commit that lands between the read and the wait still wakes them. Commits made
by other registry processes are found by polling (the watcher's timeout), so several
processes on one PostgreSQL work without any extra channel.
"""

from __future__ import annotations

import asyncio


class FeedNotifier:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attaches to the event loop the watchers run on (called from that loop)."""
        self._loop = loop
        self._event = asyncio.Event()

    def notify(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._wake)

    def _wake(self) -> None:
        if self._event is not None:
            self._event.set()
            self._event = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        if self._event is None:
            self.bind(asyncio.get_running_loop())
        assert self._event is not None
        return self._event

    @staticmethod
    async def wait(ticket: asyncio.Event, timeout: float) -> None:
        """Returns when a commit happened since `ticket` was taken, or after `timeout` seconds."""
        try:
            await asyncio.wait_for(ticket.wait(), timeout)
        except TimeoutError:
            pass
