"""A Registry that stops answering without closing its connection (a frozen host, a partition,
a load balancer dropping the flow): the router's change feed notices through HTTP/2 keepalive
and stops trusting its caches, where it used to look connected forever."""

from __future__ import annotations

from services.common import keepalive
from services.registry.config import RegistryConfig
from tests.registry.backends import CuttableProxy, InProcessRegistry
from tests.router.harness import ADMIN_TOKEN, InProcessRouter, router_config, wait_until


def test_the_change_feed_notices_a_registry_that_stopped_answering(tmp_path, monkeypatch):
    # Pings every 0.3 s instead of 20 s, so the test takes seconds; the server accepts them.
    monkeypatch.setattr(keepalive, "KEEPALIVE_TIME_MS", 300)
    monkeypatch.setattr(keepalive, "KEEPALIVE_TIMEOUT_MS", 300)
    monkeypatch.setattr(keepalive, "SERVER_OPTIONS", [("grpc.http2.min_recv_ping_interval_without_data_ms", 100),
                                                      ("grpc.keepalive_permit_without_calls", 1)])
    registry = InProcessRegistry(RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path / "registry",
                                                admin_token=ADMIN_TOKEN, watch_poll_seconds=0.2)).start()
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
        registry.stop()
