"""`python -m services.common.healthcheck`, the probe compose runs inside each container:
exit 0 only when the server answers SERVING, 1 for anything else, and one line saying why."""

from __future__ import annotations

import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.conftest import REPO_ROOT, free_port, start_module, stop_process, wait_for_health

REGISTRY_SERVICE = "loraplex.registry.v1.Registry"


def probe(address: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.common.healthcheck", address, *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def registry_address(tmp_path_factory):
    """A real registry process, the same kind of server compose probes."""
    tmp = tmp_path_factory.mktemp("registry")
    port = free_port()
    process = start_module("services.registry", "--port", str(port), "--metrics-port", "0",
                           "--grace-seconds", "1", "--data-dir", str(tmp / "data"), log=tmp / "log")
    address = f"127.0.0.1:{port}"
    try:
        wait_for_health(address, process=process)
        yield address
    finally:
        stop_process(process)


def test_serving_server_exits_0(registry_address):
    result = probe(registry_address)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{registry_address} (server): SERVING"


def test_named_service_is_checked(registry_address):
    assert probe(registry_address, "--service", REGISTRY_SERVICE).returncode == 0

    unknown = probe(registry_address, "--service", "no.such.Service")
    assert unknown.returncode == 1
    assert "SERVICE_UNKNOWN" in unknown.stdout


def test_nothing_listening_exits_1():
    address = f"127.0.0.1:{free_port()}"
    result = probe(address, "--timeout", "1")
    assert result.returncode == 1
    assert result.stdout.strip() == f"{address} (server): UNREACHABLE"


def test_not_serving_exits_1():
    # A service still warming up (loading weights) answers NOT_SERVING: that must fail the check.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = probe(f"127.0.0.1:{port}")
    finally:
        server.stop(0)
    assert result.returncode == 1
    assert "NOT_SERVING" in result.stdout
