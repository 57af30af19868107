"""Single flight versus the change feed: a lookup that arrives after a revocation or a rebind
must not share a Registry call that started before it. It used to: the revoked key was
accepted and the old adapter version served, for whoever asked while that call was out."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import NotFound, Unauthenticated
from services.router.auth import Authenticator, Caller
from services.common.feed_cache import FeedState
from services.router.resolution import Resolver, Target

CALLER = Caller("tnt_a", "acme", "key_1")


def live_feed() -> FeedState:  # as the watcher leaves it at its position marker
    feed = FeedState()
    feed.live, feed.connections = True, 1
    return feed


async def started(calls: list, count: int) -> None:
    """Waits until the fake Registry has been called `count` times (bounded, never a timing check)."""
    for _ in range(1000):
        if len(calls) >= count:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the registry was called {len(calls)} times, not {count}")


def test_a_key_used_after_its_revocation_is_verified_again_not_joined_to_an_older_check():
    class Registry:
        def __init__(self) -> None:
            self.calls, self.revoked, self.gate = [], False, asyncio.Event()

        async def verify_api_key(self, secret):
            revoked_when_asked = self.revoked
            self.calls.append(secret)
            await self.gate.wait()
            if revoked_when_asked:
                raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
            return CALLER

    async def main():
        registry = Registry()
        auth = Authenticator(registry, 600, live_feed())
        try:
            await steps(registry, auth)
        finally:
            registry.gate.set()

    async def steps(registry, auth):
        before = asyncio.ensure_future(auth.authenticate("Bearer lpx_secret"))
        await started(registry.calls, 1)
        registry.revoked = True
        auth.key_revoked("key_1")  # the feed's API_KEY_REVOKED
        after = asyncio.ensure_future(auth.authenticate("Bearer lpx_secret"))
        await started(registry.calls, 2)
        registry.gate.set()
        assert await before == CALLER  # asked before the revocation: may pass
        with pytest.raises(Unauthenticated):
            await after
        with pytest.raises(Unauthenticated):  # and nothing stale was stored
            await auth.authenticate("Bearer lpx_secret")

    asyncio.run(main())


def test_a_name_resolved_after_a_rebind_gets_the_new_version_and_later_lookups_share_that_call():
    class Catalog:
        def __init__(self) -> None:
            self.calls, self.version, self.gates = [], 1, [asyncio.Event(), asyncio.Event()]

        async def resolve_deployment(self, name, tenant_id):
            version, gate = self.version, self.gates[len(self.calls)]
            self.calls.append(version)
            await gate.wait()
            return Target(name, "tiny", tenant_id, f"adp_v{version}", "sha")

        async def get_base_model(self, name):
            raise NotFound("no")

    async def main():
        catalog = Catalog()
        resolver = Resolver(catalog, 600, live_feed())
        try:
            await steps(catalog, resolver)
        finally:  # a failed step must not leave a load waiting forever
            for gate in catalog.gates:
                gate.set()

    async def steps(catalog, resolver):
        before = asyncio.ensure_future(resolver.resolve(CALLER, "fin"))
        await started(catalog.calls, 1)
        catalog.version = 2
        resolver.deployment_changed("tnt_a", "fin")  # the feed's DEPLOYMENT_BOUND (a rebind)
        after = asyncio.ensure_future(resolver.resolve(CALLER, "fin"))
        await started(catalog.calls, 2)
        catalog.gates[0].set()
        assert (await before).adapter_id == "adp_v1"
        # The older call ending must not drop the newer one: a third caller still shares it.
        third = asyncio.ensure_future(resolver.resolve(CALLER, "fin"))
        await asyncio.sleep(0)
        catalog.gates[1].set()
        assert [(await after).adapter_id, (await third).adapter_id] == ["adp_v2", "adp_v2"]
        assert catalog.calls == [1, 2]
        assert (await resolver.resolve(CALLER, "fin")).adapter_id == "adp_v2"  # cached, no third call
        assert catalog.calls == [1, 2]

    asyncio.run(main())


def test_a_waiter_cancelled_together_with_the_caller_it_waits_on_stops_too():
    """Two clients hanging up at once: the one sharing the other's lookup used to take its own
    cancellation for the leader's, look the key up again and carry on with a dead request."""
    class Registry:
        def __init__(self) -> None:
            self.calls, self.gate = [], asyncio.Event()

        async def verify_api_key(self, secret):
            self.calls.append(secret)
            if len(self.calls) == 1:
                await self.gate.wait()
            return CALLER

    async def main():
        registry = Registry()
        auth = Authenticator(registry, 600, live_feed())
        leader = asyncio.ensure_future(auth.authenticate("Bearer lpx_secret"))
        await started(registry.calls, 1)
        waiter = asyncio.ensure_future(auth.authenticate("Bearer lpx_secret"))
        await asyncio.sleep(0)  # the waiter joins the leader's lookup
        leader.cancel()
        waiter.cancel()
        results = await asyncio.gather(leader, waiter, return_exceptions=True)
        assert [type(r) for r in results] == [asyncio.CancelledError, asyncio.CancelledError]
        assert len(registry.calls) == 1

    asyncio.run(main())


def test_an_answer_read_before_the_feed_connected_is_not_stored_after_it():
    """Router start-up (or a cursor that expired): a key verified just before the stream's
    position marker, and revoked in between, has no event coming; it must be asked again."""
    class Registry:
        def __init__(self) -> None:
            self.calls, self.revoked, self.gate = 0, False, asyncio.Event()

        async def verify_api_key(self, secret):
            revoked_when_asked = self.revoked
            self.calls += 1
            if self.calls == 1:
                await self.gate.wait()
            if revoked_when_asked:
                raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
            return CALLER

    async def main():
        registry, feed = Registry(), FeedState()
        auth = Authenticator(registry, 600, feed)
        early = asyncio.ensure_future(auth.authenticate("Bearer lpx_secret"))
        for _ in range(100):
            if registry.calls:
                break
            await asyncio.sleep(0)
        registry.revoked = True  # committed before the marker below: never replayed
        feed.live, feed.connections = True, feed.connections + 1  # the watcher at the marker
        registry.gate.set()
        assert await early == CALLER
        with pytest.raises(Unauthenticated):
            await auth.authenticate("Bearer lpx_secret")
        assert registry.calls == 2

    asyncio.run(main())
