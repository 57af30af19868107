"""Follows the Registry's change feed: purges the data of deleted tenants (tenants.py) and
forgets revoked API keys at once (auth.py), so neither outlives --auth-cache-seconds here.

The watcher keeps the `FeedState` the auth caches read (services/common/feed_cache.py): live
from the stream's position marker (and, without a usable cursor, the reconciliation below)
until the stream ends, breaks or is cancelled; while it is not live the caches are bypassed,
so a key revoked during a feed outage is refused by the next call, which asks the Registry.
Each marker counts a connection: an answer read before it is never stored after it.

One WatchChanges stream stays open (all kinds: the cursor then moves with every change, which
keeps it inside the Registry's retained history even when tenants are rarely deleted). The
cursor is stored in the trainer's database after each event is applied, so a restart resumes
after the last applied event and replays the deletions committed while the trainer was down
or disconnected; a purge interrupted by a crash runs again because its event is replayed.

Without a usable cursor (first start with this database, or OUT_OF_RANGE: the Registry no
longer retains the history after it, or its feed is behind it) the stream restarts at the
present (after_sequence -1) and, once its position marker arrives, every local tenant is
checked against the Registry (TenantPurger.reconcile): deletions up to the marker are found
that way, later ones arrive as events. Only then is the marker's sequence stored. Revocations
before the marker are found by no one, so OUT_OF_RANGE also drops every cached answer (`reset`).

The Registry need not be up when the trainer starts: the watcher retries with a backoff.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from services.common.errors import OutOfRange
from services.common.feed_cache import FeedState
from services.trainer.records import API_KEY_REVOKED, TENANT_DELETED, FeedEvent
from services.trainer.store import TrainerStore
from services.trainer.tenants import TenantPurger

log = logging.getLogger("loraplex.trainer.feed")


class FeedSource(Protocol):
    def watch_changes(self, after_sequence: int) -> AsyncIterator[FeedEvent]:
        """Marker, then events after the cursor; OutOfRange when the cursor cannot be resumed."""

    async def tenant_exists(self, tenant_id: str) -> bool: ...


class TenantDeletionWatcher:
    def __init__(self, source: FeedSource, store: TrainerStore, purger: TenantPurger, run: Callable[..., Awaitable],
                 state: FeedState, key_revoked: Callable[[str], None], reset: Callable[[], None],
                 min_backoff_s: float = 0.1, max_backoff_s: float = 5.0) -> None:
        self.source, self.store, self.purger, self.run = source, store, purger, run
        self.state, self.key_revoked, self.reset = state, key_revoked, reset
        self.min_backoff_s, self.max_backoff_s = min_backoff_s, max_backoff_s
        self._backoff = min_backoff_s
        self._failing = False
        self._cursor_unusable = False  # the Registry refused the stored cursor: start over from -1

    async def run_forever(self) -> None:
        while True:
            try:
                await self._follow()
                log.warning("the registry's change feed ended; reconnecting")
            except asyncio.CancelledError:
                raise
            except OutOfRange as exc:
                log.warning("the change feed cannot resume from the stored cursor (%s); every local tenant will be "
                            "checked against the registry and every cached key dropped", exc)
                self._cursor_unusable = True
                self.reset()
            except Exception as exc:  # noqa: BLE001 - any failure means the same: reconnect
                if not self._failing:  # say it once per outage, not at every retry
                    log.warning("cannot follow the registry's change feed (%s); deleted tenants are purged once "
                                "it is back, and API keys are verified on every call until then", exc)
                self._failing = True
            finally:
                self.state.live = False  # no invalidation can reach the caches now
            await asyncio.sleep(self._backoff)
            self._backoff = min(self.max_backoff_s, self._backoff * 2)

    async def _follow(self) -> None:
        # The refused cursor stays stored until the reconciliation below is done: a crash in
        # between is refused again at the next start and reconciles then.
        cursor = None if self._cursor_unusable else await self.run(self.store.feed_cursor)
        async for event in self.source.watch_changes(-1 if cursor is None else cursor):
            if event.is_position_marker:
                if cursor is None:
                    purged = await self.purger.reconcile(self.source.tenant_exists)
                    log.info("checked local tenants against the registry: %d deleted tenant(s) purged", purged)
                    await self.run(self.store.save_feed_cursor, event.sequence)
                    self._cursor_unusable = False
                cursor = event.sequence
                self._failing, self._backoff = False, self.min_backoff_s
                self.state.connected()  # only now: no event after the marker is applied while reconciling
                continue
            if event.kind == TENANT_DELETED:
                await self.purger.purge(event.tenant_id)
            elif event.kind == API_KEY_REVOKED:
                self.key_revoked(event.subject)
            cursor = event.sequence
            await self.run(self.store.save_feed_cursor, cursor)
