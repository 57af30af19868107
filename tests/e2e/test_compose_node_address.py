"""compose.yaml leaves --advertise-address unset so that --scale works: each replica listens
on 0.0.0.0 and must tell the router its container hostname, which Docker's DNS resolves to
that replica (0.0.0.0:50053 would send the router to itself). The flag's help says so too."""

from __future__ import annotations

import socket

import pytest

from tests.e2e.test_compose import config_of


@pytest.mark.parametrize("name", ["inference-cpu", "inference-gpu"])
def test_a_compose_node_advertises_its_container_hostname(name, monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "3f2a9c1b7e44")  # a container's hostname
    config = config_of(name)
    assert (config.host, config.advertise_address) == ("0.0.0.0", "")
    assert config.resolved_advertise_address == f"3f2a9c1b7e44:{config.port}"
    assert config.resolved_node_id == f"3f2a9c1b7e44:{config.port}"  # replicas do not collide
