"""Follows the Registry's change feed and invalidates the Router's caches.

The watcher keeps one WatchChanges stream open. It remembers the sequence of the last
event it applied and, when the stream breaks (registry restart, network), reconnects
after a short backoff with that cursor, so events committed in between are replayed
rather than lost. While disconnected the caches are bypassed (services/common/feed_cache.py);
they are trusted again once the new stream's position marker arrives, and the replayed
events that follow it at once drop whatever changed during the gap. Keeping entries across a
blip, instead of refetching every key and name after each Registry restart, is what the
cursor buys. If the cursor has fallen out of the Registry's retained history
(OUT_OF_RANGE), nothing can be replayed: every cache is dropped and the watcher starts
again from the present.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Protocol

from services.common.errors import OutOfRange
from services.common.feed_cache import FeedState

log = logging.getLogger("loraplex.router.feed")


@dataclasses.dataclass(frozen=True)
class FeedEvent:
    sequence: int
    kind: str = ""  # API_KEY_REVOKED, DEPLOYMENT_BOUND, ... (registry feed kinds)
    tenant_id: str = ""
    subject: str = ""
    is_position_marker: bool = False


class FeedSource(Protocol):
    def watch(self, after_sequence: int) -> AsyncIterator[FeedEvent]:
        """Marker, then events after the cursor; OutOfRange when the cursor is too old."""


class ChangeFeedWatcher:
    def __init__(self, source: FeedSource, apply: Callable[[FeedEvent], None], reset: Callable[[], None],
                 state: FeedState, min_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        self.source, self.apply, self.reset, self.state = source, apply, reset, state
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self.cursor = -1
        self.connects = 0

    async def run(self) -> None:
        backoff = self.min_backoff_s
        while True:
            try:
                async for event in self.source.watch(self.cursor):
                    if event.is_position_marker:
                        self.cursor = event.sequence
                        self.state.connected()
                        self.connects += 1
                        backoff = self.min_backoff_s
                        continue
                    self.cursor = event.sequence
                    self.apply(event)
                log.warning("change feed ended; reconnecting after sequence %d", self.cursor)
            except asyncio.CancelledError:
                self.state.live = False
                raise
            except OutOfRange as exc:
                log.warning("change feed cursor %d is no longer retained (%s); dropping every cache",
                            self.cursor, exc)
                self.cursor = -1
                self.state.live = False
                self.reset()
            except Exception as exc:  # noqa: BLE001 - any failure means the same: reconnect
                if self.state.live:
                    log.warning("change feed lost (%s); caches bypassed until it reconnects", exc)
            self.state.live = False
            await asyncio.sleep(backoff)
            backoff = min(self.max_backoff_s, backoff * 2)
