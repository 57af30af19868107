"""HTTP/2 keepalive between our services, at a fast pace (pings every 0.2 s instead of 20 s, the
servers accepting one every 0.1 s instead of 10 s) so the tests take seconds:
- a Registry that stops answering without closing its connection (a frozen host, a partition,
  a load balancer dropping the flow) is noticed by the router's change feed, which stops
  trusting its caches, where it used to look connected forever;
- a healthy feed is not cut by the server for pinging too often (gRPC's default answers more
  than a ping per 5 minutes with GOAWAY too_many_pings, after two strikes)."""

from __future__ import annotations

import time

import pytest

from services.common import keepalive
from services.registry.config import RegistryConfig
from tests.registry.backends import CuttableProxy, InProcessRegistry
from tests.router.harness import ADMIN_TOKEN, InProcessRouter, router_config, wait_until


@pytest.fixture
def fast_pings(monkeypatch):
    monkeypatch.setattr(keepalive, "KEEPALIVE_TIME_MS", 200)
    monkeypatch.setattr(keepalive, "KEEPALIVE_TIMEOUT_MS", 300)
    monkeypatch.setattr(keepalive, "MIN_PING_INTERVAL_MS", 100)


@pytest.fixture
def registry(tmp_path, fast_pings):
    server = InProcessRegistry(RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path / "registry",
                                              admin_token=ADMIN_TOKEN, watch_poll_seconds=0.2)).start()
    yield server
    server.stop()


def test_the_change_feed_notices_a_registry_that_stopped_answering(registry):
    proxy = CuttableProxy(registry.address)
    router = InProcessRouter(router_config([], proxy.endpoint)).start()
    try:
        router.wait_feed_live()
        feed = router.app.core.authenticator.cache.feed
        proxy.stall_after(0)  # the connection stays open, and nothing comes back
        # Without keepalive, only the default ping timeout (a minute) would notice, if a ping was out.
        wait_until(lambda: not router.run(lambda: feed.live), 30, "the feed still looks connected")
    finally:
        router.stop()
        proxy.cut()


def test_a_healthy_feed_is_not_cut_for_its_pings(registry):
    router = InProcessRouter(router_config([], registry.address)).start()
    try:
        router.wait_feed_live()
        watcher = router.app.watcher
        connected = watcher.state.connections
        time.sleep(20 * keepalive.KEEPALIVE_TIME_MS / 1000)  # an observation window of ~20 pings, not a timing check
        assert watcher.state.connections == connected and router.run(lambda: watcher.state.live)
    finally:
        router.stop()
