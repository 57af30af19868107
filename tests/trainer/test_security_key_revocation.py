"""A revoked or expired API key stops working on the trainer at once, however long the trainer
caches verified keys (--auth-cache-seconds): revocations arrive by the Registry's change feed,
the cache is not trusted while that feed is down, and a cached key is never trusted past its
expiry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from tests.registry.backends import CuttableProxy
from tests.registry.client import expect_error, unique
from tests.trainer.conftest import ADMIN_TOKEN
from tests.trainer.harness import InProcessTrainer, trainer_config, wait_until


@pytest.fixture(scope="module")
def caching_trainer(registry, tmp_path_factory) -> Iterator[InProcessTrainer]:
    server = InProcessTrainer(trainer_config(tmp_path_factory.mktemp("trainer"), registry.address, ADMIN_TOKEN,
                                             auth_cache_seconds=600)).start()
    store = server.app.queue.store
    wait_until(lambda: store.feed_cursor() is not None, 60)  # following the change feed
    yield server
    server.stop()


def _key(registry_admin, ttl_seconds: int = 0) -> rpb.CreateApiKeyResponse:
    tenant = registry_admin.CreateTenant(rpb.CreateTenantRequest(name=unique("keyed")))
    return registry_admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="k", ttl_seconds=ttl_seconds))


def _list_jobs(trainer, secret: str):
    return trainer.client(secret).call("ListJobs", pb.ListJobsRequest())


def test_a_revoked_key_is_refused_without_waiting_for_the_cache(caching_trainer, registry_admin):
    created = _key(registry_admin)
    assert not _list_jobs(caching_trainer, created.secret).jobs  # verified, and now cached for 10 minutes
    registry_admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=created.key.id))

    def refused() -> bool:
        try:
            _list_jobs(caching_trainer, created.secret)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    wait_until(refused, 60)  # the feed event's arrival, not the cache's 10 minutes


def test_a_cached_key_is_refused_once_it_expires(caching_trainer, registry_admin):
    created = _key(registry_admin, ttl_seconds=2)
    assert not _list_jobs(caching_trainer, created.secret).jobs
    expires = created.key.expires_at.seconds + created.key.expires_at.nanos / 1e9
    wait_until(lambda: time.time() > expires + 0.1, 30)
    expect_error(grpc.StatusCode.UNAUTHENTICATED, _list_jobs, caching_trainer, created.secret)


def _status(trainer, secret: str) -> grpc.StatusCode:
    try:
        _list_jobs(trainer, secret)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_a_key_revoked_while_the_feed_is_down_is_refused_at_once(registry, registry_admin, tmp_path):
    """No revocation can reach the trainer while its feed is down, so it asks the Registry on every
    call instead of trusting its cache: the revoked key used to work for the whole 10 minutes."""
    proxy = CuttableProxy(registry.address)  # the trainer's only way to the Registry
    trainer = InProcessTrainer(trainer_config(tmp_path / "trainer", proxy.endpoint, ADMIN_TOKEN,
                                              auth_cache_seconds=600)).start()
    feed = trainer.app.feed_state
    try:
        wait_until(lambda: feed.live, 60)
        revoked, kept = _key(registry_admin), _key(registry_admin)
        for created in (revoked, kept):
            assert not _list_jobs(trainer, created.secret).jobs  # verified, and now cached for 10 minutes
        proxy.cut()
        wait_until(lambda: not feed.live, 60)
        registry_admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=revoked.key.id))
        # The Registry cannot be asked: not accepted on the strength of the cache.
        expect_error(grpc.StatusCode.UNAVAILABLE, _list_jobs, trainer, revoked.secret)

        async def stop_feed() -> None:  # the feed stays down while the Registry answers again
            trainer.app.feed_task.cancel()
            await asyncio.gather(trainer.app.feed_task, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop_feed(), trainer.loop).result(30)
        proxy.resume()
        wait_until(lambda: _status(trainer, kept.secret) == grpc.StatusCode.OK, 60)  # reconnected to the Registry
        assert not feed.live
        assert _status(trainer, revoked.secret) == grpc.StatusCode.UNAUTHENTICATED
    finally:
        trainer.stop()
        proxy.cut()
