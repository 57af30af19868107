"""Caches trusted only while the change feed is live; the feed watcher's cursor handling."""

from __future__ import annotations

import asyncio

import pytest

from services.common.errors import NotFound, OutOfRange, Unauthenticated, Unavailable
from services.router.auth import Authenticator, Caller, bearer_token
from services.common.feed_cache import FeedCache, FeedState
from services.router.feed import ChangeFeedWatcher, FeedEvent
from services.router.resolution import ModelEntry, Resolver, Target


def live() -> FeedState:
    state = FeedState()
    state.live = True
    return state


class Verifier:
    def __init__(self) -> None:
        self.calls = 0
        self.valid = {"good": Caller("tnt_a", "a", "key_1")}
        self.gate: asyncio.Event | None = None

    async def verify_api_key(self, secret: str) -> Caller:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if secret not in self.valid:
            raise Unauthenticated("invalid API key", reason="INVALID_API_KEY")
        return self.valid[secret]


def test_bearer_parsing():
    assert bearer_token("Bearer abc ") == "abc" and bearer_token("bearer abc") == "abc"
    for bad in (None, "", "Basic abc", "Bearer "):
        with pytest.raises(Unauthenticated):
            bearer_token(bad)


def test_verified_keys_are_cached_while_live_and_dropped_on_revocation():
    async def main():
        verifier = Verifier()
        auth = Authenticator(verifier, 60, live())
        for _ in range(3):
            assert (await auth.authenticate("Bearer good")).tenant_id == "tnt_a"
        assert verifier.calls == 1
        auth.key_revoked("key_1")
        del verifier.valid["good"]
        with pytest.raises(Unauthenticated):
            await auth.authenticate("Bearer good")
        with pytest.raises(Unauthenticated):  # unknown keys are never cached: each one asks again
            await auth.authenticate("Bearer good")
        assert verifier.calls == 3

    asyncio.run(main())


def test_without_a_live_feed_every_request_asks_the_registry():
    async def main():
        verifier, state = Verifier(), FeedState()
        auth = Authenticator(verifier, 60, state)
        await auth.authenticate("Bearer good")
        await auth.authenticate("Bearer good")
        assert verifier.calls == 2 and len(auth.cache) == 0

    asyncio.run(main())


def test_a_lookup_racing_a_revocation_does_not_store_its_stale_answer():
    async def main():
        verifier = Verifier()
        verifier.gate = asyncio.Event()
        auth = Authenticator(verifier, 60, live())
        pending = asyncio.ensure_future(auth.authenticate("Bearer good"))
        await asyncio.sleep(0)
        auth.key_revoked("key_1")  # the event arrives while the verification is in flight
        verifier.gate.set()
        await pending  # that request was verified before the revocation: it may pass
        assert len(auth.cache) == 0  # but its answer must not outlive the revocation

    asyncio.run(main())


def test_concurrent_lookups_share_one_registry_call_and_survive_a_cancelled_leader():
    async def main():
        verifier = Verifier()
        verifier.gate = asyncio.Event()
        auth = Authenticator(verifier, 60, live())
        leader = asyncio.ensure_future(auth.authenticate("Bearer good"))
        await asyncio.sleep(0)
        followers = [asyncio.ensure_future(auth.authenticate("Bearer good")) for _ in range(5)]
        await asyncio.sleep(0)
        leader.cancel()
        await asyncio.sleep(0)
        verifier.gate.set()
        callers = await asyncio.gather(*followers)
        assert all(c.tenant_id == "tnt_a" for c in callers)
        assert verifier.calls == 2  # the cancelled leader's call, then one for all followers

    asyncio.run(main())


def test_keys_expire_by_their_own_deadline():
    async def main():
        verifier = Verifier()
        verifier.valid["old"] = Caller("tnt_a", "a", "key_2", expires_at=1.0)
        auth = Authenticator(verifier, 60, live())
        with pytest.raises(Unauthenticated, match="expired"):
            await auth.authenticate("Bearer old")

    asyncio.run(main())


def test_ttl_expiry_with_a_fake_clock():
    async def main():
        now = [0.0]
        cache = FeedCache(10, live(), clock=lambda: now[0])
        loads = []

        async def load():
            loads.append(1)
            return "v"

        await cache.get_or_load("k", load)
        now[0] = 9.9
        await cache.get_or_load("k", load)
        now[0] = 10.0
        await cache.get_or_load("k", load)
        assert len(loads) == 2

    asyncio.run(main())


class Catalog:
    def __init__(self) -> None:
        self.deployments = {("tnt_a", "fin"): Target("fin", "tiny", "tnt_a", "adp_1", "sha")}
        self.bases = {"tiny"}
        self.calls = 0

    async def resolve_deployment(self, name, tenant_id):
        self.calls += 1
        if (tenant_id, name) not in self.deployments:
            raise NotFound("deployment not found")
        return self.deployments[(tenant_id, name)]

    async def get_base_model(self, name):
        self.calls += 1
        if name not in self.bases:
            raise NotFound("no")
        return name

    async def list_deployments(self, tenant_id):
        return [ModelEntry(n, t.base_model, "adapter") for (tid, n), t in self.deployments.items() if tid == tenant_id]

    async def list_base_models(self):
        return [ModelEntry(b, b) for b in sorted(self.bases)]


def test_resolution_negative_caching_and_feed_invalidation():
    async def main():
        catalog = Catalog()
        resolver = Resolver(catalog, 60, live())
        a, b = Caller("tnt_a", "a", "k1"), Caller("tnt_b", "b", "k2")
        assert (await resolver.resolve(a, "fin")).adapter_id == "adp_1"
        assert (await resolver.resolve(a, "tiny")).adapter_id == ""
        with pytest.raises(NotFound) as foreign:
            await resolver.resolve(b, "fin")
        with pytest.raises(NotFound) as unknown:
            await resolver.resolve(b, "nope")
        assert foreign.value.message == unknown.value.message.replace("nope", "fin")
        calls = catalog.calls
        with pytest.raises(NotFound):
            await resolver.resolve(b, "fin")  # negative answers are cached too
        assert catalog.calls == calls
        with pytest.raises(NotFound):
            await resolver.resolve(b, "fin2")
        catalog.deployments[("tnt_b", "fin2")] = Target("fin2", "tiny", "tnt_b", "adp_2")
        with pytest.raises(NotFound):
            await resolver.resolve(b, "fin2")  # still the cached answer
        resolver.deployment_changed("tnt_b", "fin2")  # DEPLOYMENT_BOUND
        assert (await resolver.resolve(b, "fin2")).adapter_id == "adp_2"
        catalog.deployments[("tnt_a", "fin")] = Target("fin", "tiny", "tnt_a", "adp_3")
        resolver.adapters_changed("tnt_a")  # ADAPTER_CREATED: "latest" moved
        assert (await resolver.resolve(a, "fin")).adapter_id == "adp_3"
        assert [m.name for m in await resolver.list_models(b)] == ["fin2", "tiny"]

    asyncio.run(main())


class Source:
    """A scripted change feed: each connection plays its list, then raises its error."""

    def __init__(self, script) -> None:
        self.script, self.cursors = list(script), []

    async def watch(self, after_sequence):
        self.cursors.append(after_sequence)
        events, error = self.script.pop(0) if self.script else ([], asyncio.CancelledError())
        for event in events:
            yield event
        raise error


def test_feed_watcher_resumes_with_its_cursor_and_restarts_when_the_cursor_expired():
    applied, resets = [], []
    state = FeedState()
    marker = lambda seq: FeedEvent(seq, is_position_marker=True)  # noqa: E731
    source = Source([
        ([marker(10), FeedEvent(11, "API_KEY_REVOKED", "t", "key_1")], Unavailable("registry restarted")),
        ([marker(11), FeedEvent(12, "DEPLOYMENT_BOUND", "t", "fin")], OutOfRange("cursor pruned")),
        ([marker(40)], Unavailable("gone")),
    ])
    watcher = ChangeFeedWatcher(source, applied.append, lambda: resets.append(1), state, min_backoff_s=0.001)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(watcher.run())
    assert source.cursors == [-1, 11, -1, 40]  # resumed after 11; restarted from now after OUT_OF_RANGE
    assert [e.sequence for e in applied] == [11, 12]
    assert resets == [1] and state.live is False


def test_a_legacy_deployment_named_like_a_base_model_is_listed_once_as_the_deployment():
    """The Registry now refuses such names; data from before it did can still hold the pair."""
    async def main():
        catalog = Catalog()
        catalog.deployments[("tnt_a", "tiny")] = Target("tiny", "tiny", "tnt_a", "adp_9", "sha")
        resolver = Resolver(catalog, 60, live())
        a, b = Caller("tnt_a", "a", "k1"), Caller("tnt_b", "b", "k2")
        listed = await resolver.list_models(a)
        assert [m.name for m in listed] == ["fin", "tiny"]
        assert listed[1].adapter_name == "adapter"  # the deployment, which is what resolve runs
        assert (await resolver.resolve(a, "tiny")).adapter_id == "adp_9"
        assert [(m.name, m.adapter_name) for m in await resolver.list_models(b)] == [("tiny", "")]

    asyncio.run(main())
