"""The trainer's API-key cache follows its change feed as the router's does: trusted only while the
feed watcher says the feed is live, dropped whole when the feed's cursor is lost, one Registry
call for concurrent callers, and refusals never cached. Fakes only: no network, no timing."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import OutOfRange, Unauthenticated, Unavailable
from services.common.feed_cache import FeedState
from services.trainer.auth import Authenticator
from services.trainer.feed import TenantDeletionWatcher
from services.trainer.records import FeedEvent
from services.trainer.registry_client import KeyInfo, TenantInfo

SECRET = "Bearer lpx_secret"
KEY = KeyInfo(TenantInfo("tnt_a", "acme"), "key_1")


class Registry:
    """VerifyApiKey: valid until `revoked`; calls wait on `gate` when one is set."""

    def __init__(self) -> None:
        self.calls, self.revoked, self.gate = 0, False, None

    async def verify_api_key(self, secret: str) -> KeyInfo:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.revoked:
            raise Unauthenticated("unknown, revoked or expired token", reason="INVALID_CREDENTIALS")
        return KEY


def live_feed() -> FeedState:  # as the watcher leaves it at its position marker
    feed = FeedState()
    feed.live, feed.connections = True, 1
    return feed


def test_a_key_revoked_while_the_feed_is_down_is_refused_by_the_next_call():
    async def main():
        registry, feed = Registry(), live_feed()
        auth = Authenticator("", registry, 600, feed)
        await auth.principal(SECRET)
        await auth.principal(SECRET)
        assert registry.calls == 1  # cached while the feed is live
        feed.live = False
        registry.revoked = True  # no event can tell the trainer
        with pytest.raises(Unauthenticated):
            await auth.principal(SECRET)

    asyncio.run(main())


def test_concurrent_callers_share_one_verification_and_refusals_are_not_cached():
    async def main():
        registry = Registry()
        registry.revoked, registry.gate = True, asyncio.Event()
        auth = Authenticator("", registry, 600, live_feed())
        both = asyncio.gather(auth.principal(SECRET), auth.principal(SECRET), return_exceptions=True)
        await asyncio.sleep(0)
        registry.gate.set()
        assert [type(result) for result in await both] == [Unauthenticated, Unauthenticated]
        assert registry.calls == 1
        registry.revoked = False  # e.g. a key created a moment ago: it works at once
        assert (await auth.principal(SECRET)).tenant_id == "tnt_a"
        assert registry.calls == 2

    asyncio.run(main())


class Store:
    def __init__(self, cursor: int | None) -> None:
        self.cursor = cursor

    def feed_cursor(self) -> int | None:
        return self.cursor

    def save_feed_cursor(self, cursor: int | None) -> None:
        self.cursor = cursor


class Purger:
    def __init__(self) -> None:
        self.reconciled = 0

    async def reconcile(self, exists) -> int:
        self.reconciled += 1
        return 0


END = object()  # ends the current stream


class Feed:
    """WatchChanges: streams play what the test puts in `items`, one by one: events, END, or an
    exception to raise."""

    def __init__(self) -> None:
        self.items: asyncio.Queue = asyncio.Queue()
        self.opened: list[int] = []

    async def watch_changes(self, after_sequence: int):
        self.opened.append(after_sequence)
        while (item := await self.items.get()) is not END:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def tenant_exists(self, tenant_id: str) -> bool:
        return True


async def run(fn, *args):
    return fn(*args)


async def settle(condition, what: str) -> None:
    """Lets the watcher run until `condition()` holds (bounded by steps, never by time)."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never: {what}")


def test_the_watcher_keeps_the_feed_state_and_a_lost_cursor_drops_every_cached_key():
    async def main():
        registry, feed_state, source, purger = Registry(), FeedState(), Feed(), Purger()
        auth = Authenticator("", registry, 600, feed_state)
        watcher = TenantDeletionWatcher(source, Store(7), purger, run, feed_state, key_revoked=auth.forget_key,
                                        reset=auth.clear, min_backoff_s=0, max_backoff_s=0)
        task = asyncio.create_task(watcher.run_forever())
        try:
            source.items.put_nowait(FeedEvent(7, is_position_marker=True))
            await settle(lambda: feed_state.live, "live at the marker")
            assert (feed_state.connections, source.opened) == (1, [7])
            await auth.principal(SECRET)  # verified and cached: the feed is live
            source.items.put_nowait(END)
            await settle(lambda: not feed_state.live, "down once the stream ended")
            source.items.put_nowait(OutOfRange("cursor 7 is no longer retained"))
            await settle(lambda: len(source.opened) == 3, "reconnected from the present")
            assert source.opened[2] == -1 and not feed_state.live
            source.items.put_nowait(FeedEvent(20, is_position_marker=True))
            await settle(lambda: feed_state.live, "live once reconciled")
            assert (purger.reconciled, feed_state.connections) == (1, 2)
            await auth.principal(SECRET)
            assert registry.calls == 2  # what was cached before the lost cursor was dropped
            source.items.put_nowait(Unavailable("the connection broke"))
            await settle(lambda: not feed_state.live, "down once the stream broke")
            source.items.put_nowait(FeedEvent(20, is_position_marker=True))
            await settle(lambda: feed_state.live, "live again")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert not feed_state.live  # cancelled: nothing follows the feed any more

    asyncio.run(main())
