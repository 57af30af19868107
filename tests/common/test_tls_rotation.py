"""Certificate rotation without a restart (services/common/tls_reload.py): a real Registry
serving gRPC over TLS and the router's real HTTPS server pick up replaced certificate, key and
client-CA files for new connections, and keep the last good pair while the files are broken or
do not match."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from services.common import tls, tls_channel, tls_reload
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.tls_reload import WatchedCertificates
from services.registry.config import RegistryConfig
from services.router import http_server
from services.router.http_server import HttpServer
from tests.common.test_tls_registry import TOKEN, create_tenant
from tests.conftest import free_port
from tests.registry.backends import InProcessRegistry
from tests.registry.client import bearer
from tests.tls_certs import Certs, make_certs


@pytest.fixture(autouse=True)
def check_files_at_every_handshake(monkeypatch):
    monkeypatch.setattr(tls_reload, "CHECK_INTERVAL_S", 0.0)
    monkeypatch.setattr(tls_channel, "CHECK_INTERVAL_S", 0.0)
    monkeypatch.setattr(http_server, "RELOAD_CHECK_S", 0.05)


@pytest.fixture
def first(tmp_path) -> Certs:
    return make_certs(tmp_path / "first")


@pytest.fixture
def second(tmp_path) -> Certs:
    """Certificates from another CA: what the served files are rotated to."""
    return make_certs(tmp_path / "second")


@pytest.fixture
def served(tmp_path, first) -> tuple[Path, Path, Path]:
    """The files a server is configured with (copies, so tests can replace them)."""
    folder = tmp_path / "served"
    folder.mkdir()
    files = folder / "cert.pem", folder / "key.pem", folder / "client-ca.pem"
    for source, target in zip((first.server_cert, first.server_key, first.ca), files):
        shutil.copyfile(source, target)
    return files


def replace(target: Path, source: Path | bytes) -> None:
    """An atomic replacement by rename, as Kubernetes' secret volumes and cert-manager do."""
    temporary = target.with_suffix(".new")
    temporary.write_bytes(source if isinstance(source, bytes) else source.read_bytes())
    os.replace(temporary, target)


def rotate_pair(served, certs: Certs) -> None:
    replace(served[0], certs.server_cert)
    replace(served[1], certs.server_key)


def refused(address: str, client_tls: tls.ClientTls) -> bool:
    try:
        create_tenant(address, client_tls)
    except grpc.RpcError as exc:
        return exc.code() == grpc.StatusCode.UNAVAILABLE
    return False


# --- the watcher itself ---

def test_the_watcher_reports_a_change_once_and_keeps_the_last_good_pair(served, first, second, caplog):
    watched = WatchedCertificates(served[0], served[1])
    assert watched.refresh() is None  # nothing changed
    rotate_pair(served, second)
    fresh = watched.refresh()
    assert fresh is not None and fresh.cert == second.server_cert.read_bytes()
    assert watched.refresh() is None and watched.current() == fresh
    # half a rotation: a certificate with the key of another one
    replace(served[0], first.server_cert)
    with caplog.at_level(logging.ERROR, logger="loraplex.tls"):
        assert watched.refresh() is None
        assert watched.refresh() is None  # the same bad state is reported once, not per handshake
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "does not match the certificate" in caplog.records[0].getMessage()
    assert watched.current() == fresh
    replace(served[1], first.server_key)  # the rotation completes
    assert watched.refresh().cert == first.server_cert.read_bytes()
    assert watched.reloads == 2


def test_unreadable_or_garbage_files_keep_the_previous_pair(served, second):
    watched = WatchedCertificates(served[0], served[1])
    before = watched.current()
    served[0].unlink()
    assert watched.refresh() is None and watched.current() == before
    served[0].write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n")
    assert watched.refresh() is None and watched.current() == before
    rotate_pair(served, second)
    assert watched.refresh() is not None


# --- gRPC: a real Registry ---

def start_registry(tmp_path, served, mutual: bool, client_tls) -> InProcessRegistry:
    cert, key, client_ca = served
    config = RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path / "registry", admin_token=TOKEN,
                            tls_cert=cert, tls_key=key, tls_client_ca=client_ca if mutual else None)
    return InProcessRegistry(config, client_tls=client_tls).start()


def test_a_grpc_server_serves_a_rotated_certificate_to_new_connections(tmp_path, served, first, second):
    registry = start_registry(tmp_path, served, mutual=False, client_tls=first.client())
    try:
        old_channel = tls.channel(registry.address, first.client())
        old_stub = registry_pb2_grpc.RegistryStub(old_channel)
        assert old_stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(TOKEN), timeout=10)  # connected
        assert create_tenant(registry.address, first.client())
        assert refused(registry.address, second.client())
        rotate_pair(served, second)
        assert create_tenant(registry.address, second.client())
        assert refused(registry.address, first.client())  # new connections get the new certificate
        # a half-done rotation (new certificate, old key) and garbage leave the last good pair served
        replace(served[0], first.server_cert)
        assert create_tenant(registry.address, second.client())
        replace(served[0], b"garbage")
        assert create_tenant(registry.address, second.client())
        # a connection made before the rotation keeps working
        assert old_stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(TOKEN), timeout=10)
        old_channel.close()
    finally:
        registry.stop()


def test_a_rotated_client_ca_decides_which_client_certificates_get_in(tmp_path, served, first, second):
    registry = start_registry(tmp_path, served, mutual=True, client_tls=first.client(with_certificate=True))
    try:
        first_client = first.client(with_certificate=True)
        # the second CA's client certificate, verifying the (unchanged) server with the first CA
        second_client = tls.ClientTls(first.ca, second.client_cert, second.client_key)
        assert create_tenant(registry.address, first_client)
        assert refused(registry.address, second_client)
        replace(served[2], second.ca)
        assert create_tenant(registry.address, second_client)
        assert refused(registry.address, first_client)
    finally:
        registry.stop()


# --- clients: a service's long-lived channel follows its own files ---

def test_a_client_channel_follows_its_rotated_certificate_and_ca(tmp_path, first, second, caplog):
    """mutual TLS on both sides, the whole PKI rotated: the server comes back under the second CA
    (certificate and client CA), and the client's files are replaced by the second CA's. The
    same channel (stubs are built once) reconnects with them."""
    files = tmp_path / "client"
    files.mkdir()
    ca, cert, key = files / "ca.pem", files / "client.pem", files / "client-key.pem"
    for source, target in ((first.ca, ca), (first.client_cert, cert), (first.client_key, key)):
        shutil.copyfile(source, target)
    port = free_port()

    def serve(certs) -> InProcessRegistry:
        config = RegistryConfig(port=port, metrics_port=0, data_dir=tmp_path / f"registry-{certs.ca.parent.name}",
                                admin_token=TOKEN, **certs.server(mutual=True))
        return InProcessRegistry(config, client_tls=certs.client(with_certificate=True)).start()

    async def tenants(stub) -> bool:
        try:
            await stub.ListTenants(pb.ListTenantsRequest(), metadata=bearer(TOKEN), timeout=10)
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            return False
        return True

    async def scenario():
        channel = tls.aio_channel(f"127.0.0.1:{port}", tls.ClientTls(ca, cert, key))
        stub = registry_pb2_grpc.RegistryStub(channel)
        registry = serve(first)
        try:
            assert await tenants(stub)
        finally:
            registry.stop()
        registry = serve(second)  # the same address, under the second CA only
        try:
            assert not await tenants(stub)  # the first CA's files: refused both ways
            with caplog.at_level(logging.ERROR, logger="loraplex.tls"):
                replace(cert, second.client_cert)  # half a rotation: the new certificate, the old key
                assert not await tenants(stub)
                assert "cannot be used" in caplog.text and channel.generation == 0
            replace(key, second.client_key)
            replace(ca, second.ca)
            assert await tenants(stub) and channel.generation == 1
        finally:
            registry.stop()
            await channel.close()

    asyncio.run(scenario())


# --- HTTPS: the router's HTTP server ---

async def hello(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def get(url: str, ca: Path) -> str:
    # a new connection per call: a new handshake
    with urllib.request.urlopen(url, context=tls.ClientTls(ca).ssl_context(), timeout=10) as response:
        return response.read().decode()


async def answers(url: str, ca: Path) -> bool:
    try:
        return await asyncio.to_thread(get, url, ca) == "hello"
    except urllib.error.URLError as exc:
        assert isinstance(exc.reason, ssl.SSLCertVerificationError), exc
        return False


async def eventually(condition, seconds: float = 20.0) -> bool:
    """Polls an outcome (the reload runs in the background); fails after `seconds`."""
    for _ in range(int(seconds / 0.05)):
        if await condition():
            return True
        await asyncio.sleep(0.05)
    return False


def test_the_https_api_serves_a_rotated_certificate(served, first, second, caplog):
    async def scenario():
        server = HttpServer(hello, "127.0.0.1", 0, 0.5, tls=tls.server_tls(served[0], served[1]))
        await server.start()
        url = f"https://127.0.0.1:{server.port}/"
        try:
            assert await answers(url, first.ca) and not await answers(url, second.ca)
            rotate_pair(served, second)
            assert await eventually(lambda: answers(url, second.ca))
            assert not await answers(url, first.ca)
            with caplog.at_level(logging.ERROR, logger="loraplex.tls"):
                replace(served[0], first.server_cert)  # new certificate, old key: not taken
                assert await eventually(lambda: asyncio.sleep(0, result=bool(caplog.records)))
            assert await answers(url, second.ca)
        finally:
            await server.stop()

    asyncio.run(scenario())
