"""TLS on a real service (the Registry, in-process on a free port, with certificates made for
the test): who gets through, who is refused (UNAVAILABLE at the client, as gRPC fails a
handshake), mutual TLS, the probes `loraplex up` and compose use, and the config errors that
stop a process before it serves."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest

from services.common import errors, tls
from services.common.config import parse_config
from services.common.healthcheck import health_status
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.stack import StackConfig, child_environment
from services.common.stack_base_model import register_base_model
from services.registry.config import RegistryConfig
from services.router.config import RouterConfig
from services.trainer.registry_client import RegistryClient
from tests.conftest import REPO_ROOT, free_port
from tests.registry.backends import InProcessRegistry
from tests.registry.client import bearer, unique

TOKEN = "tls-admin"


def clean_env(**variables: str) -> dict[str, str]:
    """Our environment without any LORAPLEX_* variable, plus `variables`."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("LORAPLEX_")}, **variables}


def start_registry(tmp_path, certs, mutual: bool) -> InProcessRegistry:
    config = RegistryConfig(port=0, metrics_port=0, data_dir=tmp_path, admin_token=TOKEN, **certs.server(mutual))
    return InProcessRegistry(config, client_tls=certs.client(with_certificate=mutual)).start()


@pytest.fixture(scope="module")
def registry(tmp_path_factory, tls_certs) -> Iterator[InProcessRegistry]:
    """TLS, no client certificates asked."""
    server = start_registry(tmp_path_factory.mktemp("tls-registry"), tls_certs, mutual=False)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def mtls_registry(tmp_path_factory, tls_certs) -> Iterator[InProcessRegistry]:
    """Mutual TLS: every caller must present a certificate our CA issued."""
    server = start_registry(tmp_path_factory.mktemp("mtls-registry"), tls_certs, mutual=True)
    yield server
    server.stop()


def create_tenant(address: str, client_tls: tls.ClientTls | None) -> pb.Tenant:
    with tls.channel(address, client_tls) as channel:
        return registry_pb2_grpc.RegistryStub(channel).CreateTenant(
            pb.CreateTenantRequest(name=unique("tls")), metadata=bearer(TOKEN), timeout=10)


def refused(address: str, client_tls: tls.ClientTls | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as failed:
        create_tenant(address, client_tls)
    return failed.value.code()


def test_a_client_trusting_the_ca_gets_through_plaintext_and_other_cas_are_refused(registry, tls_certs):
    assert create_tenant(registry.address, tls_certs.client()).name.startswith("tls")
    assert refused(registry.address, None) == grpc.StatusCode.UNAVAILABLE  # clear text on a TLS port
    assert refused(registry.address, tls.ClientTls(tls_certs.other_ca)) == grpc.StatusCode.UNAVAILABLE
    # the certificate names 127.0.0.1 and localhost, nothing else (the probe's --tls-server-name)
    assert create_tenant(registry.address, tls.ClientTls(tls_certs.ca, server_name="localhost"))
    renamed = tls.ClientTls(tls_certs.ca, server_name="registry.example")
    assert refused(registry.address, renamed) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_refuses_callers_without_our_client_certificate(mtls_registry, tls_certs):
    assert create_tenant(mtls_registry.address, tls_certs.client(with_certificate=True)).name.startswith("tls")
    assert refused(mtls_registry.address, tls_certs.client()) == grpc.StatusCode.UNAVAILABLE
    stranger = tls.ClientTls(tls_certs.ca, tls_certs.other_client_cert, tls_certs.other_client_key)
    assert refused(mtls_registry.address, stranger) == grpc.StatusCode.UNAVAILABLE
    assert refused(mtls_registry.address, None) == grpc.StatusCode.UNAVAILABLE


def test_a_service_client_verifies_keys_over_mutual_tls(mtls_registry, tls_certs):
    """The trainer's Registry client (trainer -> registry), with the client settings a
    TrainerConfig builds from --tls-ca/--tls-client-cert/--tls-client-key."""
    admin = registry_pb2_grpc.RegistryStub(mtls_registry.channel)
    tenant = admin.CreateTenant(pb.CreateTenantRequest(name=unique("t")), metadata=bearer(TOKEN), timeout=10)
    key = admin.CreateApiKey(pb.CreateApiKeyRequest(tenant=tenant.id, name="k"), metadata=bearer(TOKEN), timeout=10)

    async def verify(client_tls):
        client = RegistryClient(mtls_registry.address, TOKEN, 10, client_tls=client_tls)
        try:
            return await client.verify_api_key(key.secret)
        finally:
            await client.close()

    from services.trainer.config import TrainerConfig

    config = TrainerConfig(port=0, metrics_port=0, **tls_certs.client_fields())
    assert asyncio.run(verify(config.client_tls)).tenant.id == tenant.id
    with pytest.raises(errors.Unavailable, match="UNAVAILABLE"):  # no client certificate
        asyncio.run(verify(tls_certs.client()))


def test_the_probes_and_the_base_model_registration_speak_tls(mtls_registry, tls_certs, tiny_model_dir):
    mutual = tls_certs.client(with_certificate=True)
    assert health_status(mtls_registry.address, client_tls=mutual) == "SERVING"
    assert health_status(mtls_registry.address, client_tls=tls_certs.client()) == "UNREACHABLE"
    assert health_status(mtls_registry.address) == "UNREACHABLE"
    location = register_base_model(mtls_registry.address, TOKEN, "tls-base", tiny_model_dir, client_tls=mutual)
    assert location == str(tiny_model_dir.resolve())
    # The compose probe: the TLS flags, or the service's own LORAPLEX_TLS_* variables.
    probe = [sys.executable, "-m", "services.common.healthcheck", mtls_registry.address]
    env = clean_env(LORAPLEX_TLS_CA=str(tls_certs.ca), LORAPLEX_TLS_CLIENT_CERT=str(tls_certs.client_cert),
                    LORAPLEX_TLS_CLIENT_KEY=str(tls_certs.client_key))
    by_env = subprocess.run(probe, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert by_env.returncode == 0 and "SERVING" in by_env.stdout, by_env.stdout + by_env.stderr
    no_cert = subprocess.run([*probe, "--tls-ca", str(tls_certs.ca)], cwd=REPO_ROOT, env=clean_env(),
                             capture_output=True, text=True, timeout=30)
    assert no_cert.returncode == 1 and "UNREACHABLE" in no_cert.stdout


def test_loraplex_up_hands_its_tls_files_to_every_child(tmp_path, tls_certs, monkeypatch):
    monkeypatch.setenv("LORAPLEX_TLS_CERT", "/inherited/cert.pem")  # never reaches a child
    config = StackConfig(data_dir=tmp_path, **tls_certs.server(mutual=True), **tls_certs.client_fields())
    env = child_environment(config, "token")
    assert env["LORAPLEX_TLS_CERT"] == str(tls_certs.server_cert)
    assert env["LORAPLEX_TLS_CLIENT_CA"] == env["LORAPLEX_TLS_CA"] == str(tls_certs.ca)
    assert env["LORAPLEX_TLS_CLIENT_CERT"] == str(tls_certs.client_cert)
    assert child_environment(StackConfig(data_dir=tmp_path), "token")["LORAPLEX_TLS_CERT"] == ""
    assert config.client_tls == tls_certs.client(with_certificate=True)
    assert "-cacert" in tls.grpcurl_flags(config.client_tls)


def bad_files(tmp_path, certs) -> dict[str, str]:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return {"cert": str(certs.server_cert), "key": str(certs.server_key), "ca": str(certs.ca),
            "missing": str(tmp_path / "missing.pem"), "garbage": str(garbage),
            "client_key": str(certs.client_key), "client_cert": str(certs.client_cert)}


@pytest.mark.parametrize(("cls", "argv", "message"), [
    (RegistryConfig, ["--tls-cert", "{cert}"], "--tls-cert needs --tls-key"),
    (RegistryConfig, ["--tls-key", "{key}"], "--tls-key needs --tls-cert"),
    (RegistryConfig, ["--tls-cert", "{missing}", "--tls-key", "{key}"], "--tls-cert {missing}: cannot read it"),
    (RegistryConfig, ["--tls-cert", "{garbage}", "--tls-key", "{key}"], "--tls-cert {garbage}: not a PEM certificate"),
    (RegistryConfig, ["--tls-cert", "{cert}", "--tls-key", "{garbage}"], "--tls-key {garbage}: not a PEM private key"),
    (RegistryConfig, ["--tls-cert", "{cert}", "--tls-key", "{client_key}"], "does not match the certificate"),
    (RegistryConfig, ["--tls-client-ca", "{ca}"], "--tls-client-ca needs --tls-cert"),
    (RegistryConfig, ["--tls-cert", "{cert}", "--tls-key", "{key}", "--tls-client-ca", "{garbage}"],
     "--tls-client-ca {garbage}: not a PEM certificate"),
    (RouterConfig, ["--tls-ca", "{missing}"], "--tls-ca {missing}: cannot read it"),
    (RouterConfig, ["--tls-client-cert", "{client_cert}"], "--tls-client-cert needs --tls-client-key"),
    (StackConfig, ["--tls-cert", "{cert}", "--tls-key", "{key}"], "--tls-cert needs --tls-ca"),
    (StackConfig, ["--tls-ca", "{ca}"], "--tls-ca needs --tls-cert"),
])
def test_bad_tls_settings_exit_2_naming_the_flag(cls, argv, message, tmp_path, tls_certs, capsys):
    files = bad_files(tmp_path, tls_certs)
    with pytest.raises(SystemExit) as exited:
        parse_config(cls, [arg.format(**files) for arg in argv], env={})
    assert exited.value.code == 2
    assert message.format(**files) in capsys.readouterr().err


def test_a_service_with_a_garbage_certificate_exits_before_serving(tmp_path, tls_certs):
    files, port = bad_files(tmp_path, tls_certs), free_port()
    result = subprocess.run([sys.executable, "-m", "services.registry", "--port", str(port), "--metrics-port", "0",
                             "--data-dir", str(tmp_path / "data")], cwd=REPO_ROOT, capture_output=True, text=True,
                            timeout=60, env=clean_env(LORAPLEX_TLS_CERT=files["garbage"],
                                                      LORAPLEX_TLS_KEY=files["key"]))
    assert result.returncode == 2
    assert f"--tls-cert {files['garbage']}: not a PEM certificate" in result.stderr
    assert not (tmp_path / "data").exists()  # it stopped before opening anything


def test_a_certificate_spoilt_after_the_config_was_read_is_named_at_bind_time(tmp_path, tls_certs):
    from services.common.config import ServerConfig
    from services.common.placeholder import PlaceholderApp
    from services.common.server import start_server
    from services.common.services import TRAINER

    cert = tmp_path / "cert.pem"
    cert.write_bytes(tls_certs.server_cert.read_bytes())
    config = ServerConfig(port=0, tls_cert=cert, tls_key=tls_certs.server_key)
    cert.write_text("garbage")
    with pytest.raises(tls.TlsError, match=f"--tls-cert {cert}: not a PEM certificate"):
        asyncio.run(start_server(PlaceholderApp([(TRAINER, "test")]), config))
