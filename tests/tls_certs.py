"""Real certificates for TLS tests, made with `cryptography`: a CA, a server certificate for
127.0.0.1 and localhost, a client certificate, and a second CA with a client certificate of
its own (trusted by nobody)."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.common.tls import ClientTls


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)
    return path


def _write_cert(cert: x509.Certificate, path: Path) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class _Authority:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.name = _name(name)
        self.cert = self._builder(self.name, self.key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(self.key, hashes.SHA256())

    def _builder(self, subject: x509.Name, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self.name).public_key(public_key)
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, common_name: str, usage, folder: Path, stem: str, server: bool = False) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(_name(common_name), key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True).add_extension(
            x509.ExtendedKeyUsage([usage]), critical=False)
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return _write_cert(cert, folder / f"{stem}.pem"), _write_key(key, folder / f"{stem}-key.pem")


@dataclasses.dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path

    def server(self, mutual: bool = False) -> dict[str, Path]:
        """The server's config fields (a ServerConfig's keywords); `mutual`: client certificates required."""
        fields = {"tls_cert": self.server_cert, "tls_key": self.server_key}
        return {**fields, "tls_client_ca": self.ca} if mutual else fields

    def client_fields(self) -> dict[str, Path]:
        """A calling service's config fields: trusts our CA, presents our client certificate."""
        return {"tls_ca": self.ca, "tls_client_cert": self.client_cert, "tls_client_key": self.client_key}

    def client(self, with_certificate: bool = False) -> ClientTls:
        if with_certificate:
            return ClientTls(self.ca, self.client_cert, self.client_key)
        return ClientTls(self.ca)


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ours, other = _Authority("loraplex test CA"), _Authority("some other CA")
    ca = _write_cert(ours.cert, folder / "ca.pem")
    other_ca = _write_cert(other.cert, folder / "other-ca.pem")
    server = ours.issue("localhost", ExtendedKeyUsageOID.SERVER_AUTH, folder, "server", server=True)
    client = ours.issue("loraplex-client", ExtendedKeyUsageOID.CLIENT_AUTH, folder, "client")
    stranger = other.issue("stranger", ExtendedKeyUsageOID.CLIENT_AUTH, folder, "stranger")
    return Certs(ca, *server, *client, other_ca, *stranger)
