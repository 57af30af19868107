"""A small TTL cache that is trusted only while the Registry's change feed is live.

The Router caches API-key verifications and model-name resolutions, the Trainer API-key
verifications and tenant lookups, so a request costs no Registry round trip. Each service
follows the feed with its own watcher (router/feed.py, trainer/feed.py), which keeps a
`FeedState` up to date and turns events into `invalidate*` calls. Staleness is bounded twice
over: by a TTL, and by the change feed, whose events invalidate entries within milliseconds
of a commit. Two rules keep a revoked key, a deleted tenant or a rebound name from surviving:

- While the feed is down (`FeedState.live` is False) the cache is bypassed: every lookup
  goes to the Registry and nothing is stored, because no invalidation could reach us.
- Every invalidation bumps an epoch. A lookup that started before an invalidation does not
  store its (possibly stale) answer: "verify, then revoke event, then store" cannot happen.
  Nor does one that started before the feed (re)connected: a change committed before the
  new stream's position marker is never delivered (at start-up, or after the cursor
  expired), so an answer read before it could otherwise be stored after it and trusted.

Concurrent lookups of the same key share one Registry call (single flight), so a burst
of requests with a new key costs one verification. Only lookups of the same era share it:
a request that arrives after a revocation or a rebind must not be handed the answer of a
Registry call that started before it (the revoked key accepted, the old version served).

The cache holds at most `max_entries`. Keys come from callers (every unknown model name a
tenant sends to the Router is cached as NOT_FOUND), and an expired entry is otherwise only
dropped when the same key is read again: unbounded, one tenant sending fresh names grew the
shared router's memory without limit. When full, expired entries go first, then the oldest, down
to 90% (so the sweep runs once per tenth of the bound, not on every store). Dropping an
entry is always safe: the next lookup asks the Registry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: Entries are small (a name, a target or an error), so this is tens of MB at most.
MAX_ENTRIES = 100_000


class FeedState:
    """Whether the change feed is connected and caught up enough to trust caches, and how many
    times it has connected (the watcher counts each position marker)."""

    def __init__(self) -> None:
        self.live = False
        self.connections = 0

    def connected(self) -> None:
        """At a stream's position marker: caches are trusted again, and an answer loaded before
        now may predate changes the stream will never deliver, so it is not stored."""
        self.live = True
        self.connections += 1


class FeedCache(Generic[K, V]):
    def __init__(self, ttl_s: float, feed: FeedState, *, cache_errors: tuple[type[Exception], ...] = (),
                 clock: Callable[[], float] = time.monotonic, max_entries: int = MAX_ENTRIES) -> None:
        self.ttl_s, self.feed, self.cache_errors, self.clock = ttl_s, feed, cache_errors, clock
        self.max_entries = max_entries
        self._entries: dict[K, tuple[float, V | Exception]] = {}
        #: key -> (the era its load started in, the load's result)
        self._inflight: dict[K, tuple[tuple[int, int], asyncio.Future]] = {}
        self._epoch = 0

    @property
    def _era(self) -> tuple[int, int]:
        """Changes when an answer loaded before may be stale: an invalidation or a feed (re)connect."""
        return self._epoch, self.feed.connections

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: K) -> tuple[bool, V | Exception | None]:
        """(hit, value-or-cached-error)."""
        if not self.feed.live or self.ttl_s <= 0:
            return False, None
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        expires, value = entry
        if self.clock() >= expires:
            del self._entries[key]
            return False, None
        return True, value

    async def get_or_load(self, key: K, load: Callable[[], Awaitable[V]],
                          ttl_of: Callable[[V], float] | None = None) -> V:
        """The cached value, or `load()`'s result (stored when still valid); raises cached errors.

        ttl_of: a shorter lifetime for a particular value (e.g. a key that expires sooner).
        """
        while True:
            hit, value = self.get(key)
            if hit:
                if isinstance(value, Exception):
                    raise value
                return value
            era, pending = self._inflight.get(key, (None, None))
            if pending is None or era != self._era:
                break  # none, or one that may return what has been invalidated since it started
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                # Cancelled ourselves (maybe together with the caller doing the load: two clients
                # hanging up at once): stop, rather than load and run a request nobody awaits.
                if not pending.cancelled() or asyncio.current_task().cancelling():
                    raise
                # only the caller doing the load was cancelled: look again, maybe load in our own name
        future = asyncio.get_running_loop().create_future()
        era = self._era
        self._inflight[key] = (era, future)
        try:
            value = await load()
        except Exception as exc:
            if isinstance(exc, self.cache_errors):
                self._store(key, exc, era, self.ttl_s)
            _settle(future, error=exc)
            raise
        except BaseException:  # cancelled: waiters must not hang on our future
            future.cancel()
            raise
        finally:
            if self._inflight.get(key, (None, None))[1] is future:  # a newer load may have replaced it
                del self._inflight[key]
        ttl = self.ttl_s if ttl_of is None else min(self.ttl_s, ttl_of(value))
        self._store(key, value, era, ttl)
        _settle(future, result=value)
        return value

    def _store(self, key: K, value: V | Exception, era: tuple[int, int], ttl: float) -> None:
        if era == self._era and self.feed.live and ttl > 0:
            if key not in self._entries and len(self._entries) >= self.max_entries:
                self._make_room()
            self._entries[key] = (self.clock() + ttl, value)

    def _make_room(self) -> None:
        """Drops expired entries, then the oldest stored, until the cache is at 90% of its bound."""
        now = self.clock()
        for stale in [key for key, (expires, _) in self._entries.items() if now >= expires]:
            del self._entries[stale]
        target = self.max_entries * 9 // 10
        while len(self._entries) > target:
            del self._entries[next(iter(self._entries))]  # dicts keep insertion order: the oldest

    def invalidate(self, predicate: Callable[[K], bool]) -> int:
        """Drops entries whose key matches; returns how many."""
        self._epoch += 1
        doomed = [key for key in self._entries if predicate(key)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def invalidate_values(self, predicate: Callable[[V], bool]) -> int:
        self._epoch += 1
        doomed = [key for key, (_, value) in self._entries.items()
                  if not isinstance(value, Exception) and predicate(value)]
        for key in doomed:
            del self._entries[key]
        return len(doomed)

    def clear(self) -> None:
        self._epoch += 1
        self._entries.clear()


def seconds_until(expires_at: float | None) -> float:
    """For `ttl_of`: seconds left until a unix time (None: never), so an entry never outlives
    what it caches (an API key that expires sooner than the TTL)."""
    return float("inf") if expires_at is None else expires_at - time.time()


def _settle(future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
        future.exception()  # mark retrieved: nobody may be waiting, which is fine
    else:
        future.set_result(result)
