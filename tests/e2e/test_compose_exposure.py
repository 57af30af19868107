"""What compose.yaml publishes beyond this machine: the APIs (they authenticate every call),
never the Prometheus endpoints, which answer anyone (load, pools, request counts)."""

from __future__ import annotations

import pytest

from tests.e2e.test_compose import config_of, server_services, services


def _published(entry) -> tuple[str, int]:
    """(host address, container port) of one `ports:` entry; "" = every interface."""
    if isinstance(entry, dict):
        return entry.get("host_ip", ""), int(entry["target"])
    parts = str(entry).split("/")[0].split(":")
    return (parts[0] if len(parts) == 3 else ""), int(parts[-1])


@pytest.mark.parametrize("name", server_services())
def test_metrics_ports_are_published_on_this_machine_only(name):
    metrics_port = config_of(name).metrics_port
    for entry in services()[name].get("ports", []):
        host, port = _published(entry)
        if port == metrics_port:
            assert host == "127.0.0.1", f"{name}: /metrics on {entry!r} is reachable from other machines"
