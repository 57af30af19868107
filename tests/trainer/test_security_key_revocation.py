"""A revoked or expired API key stops working on the trainer at once, however long the trainer
caches verified keys (--auth-cache-seconds): revocations arrive by the Registry's change feed,
and a cached key is never trusted past its expiry."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
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
