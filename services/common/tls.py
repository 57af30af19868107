"""TLS from PEM files: gRPC server credentials, gRPC client channels, the HTTPS API's files.

Server side (every service, ServerConfig): `--tls-cert` and `--tls-key` make the gRPC port
serve TLS only (and the router's HTTP API HTTPS, with the same certificate); `--tls-client-ca`
also requires every gRPC caller to present a certificate that CA issued (mutual TLS).
Client side (every process that calls another, ClientTlsConfig): `--tls-ca` verifies the
server's certificate, whose DNS or IP subjectAltName must match the host dialled;
`--tls-client-cert` and `--tls-client-key` are presented to servers that require one.

The files are checked when a config is built (`server_tls` / `client_tls`), so a missing,
unreadable or invalid file, or a key that does not match its certificate, stops the process
before it serves anything, with a message naming the flag. Servers re-read them when they
change (tls_reload.py: certificate rotation without a restart); the services' long-lived
asyncio channels re-read theirs likewise (tls_channel.py). Only credentials and
channels live here, no service logic.
"""

from __future__ import annotations

import dataclasses
import shlex
import ssl
from collections.abc import Sequence
from pathlib import Path

import grpc

from services.common.tls_channel import RotatingChannel
from services.common.tls_reload import WatchedCertificates

Options = Sequence[tuple[str, object]]


class TlsError(ValueError):
    """A TLS setting or file that cannot be used; the message names the flag."""


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None


def _check_certificates(path: Path, flag: str) -> None:
    """PEM certificates that parse (a CA bundle or a certificate chain)."""
    text = _read(path, flag).decode("ascii", errors="replace")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError) as exc:
        raise TlsError(f"{flag} {path}: not a PEM certificate file ({exc})") from None


def _check_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> None:
    _check_certificates(cert, cert_flag)
    if b"ENCRYPTED" in _read(key, key_flag):
        raise TlsError(f"{key_flag} {key}: the private key is encrypted; gRPC needs an unencrypted one "
                       "(keep the file readable by the service's user only)")
    try:
        # An empty password, so that a key encrypted after all fails here instead of prompting.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=b"")
    except ssl.SSLError as exc:
        what = "does not match the certificate" if exc.reason == "KEY_VALUES_MISMATCH" else "not a PEM private key"
        raise TlsError(f"{key_flag} {key}: {what} in {cert_flag} {cert} ({exc})") from None


def _pair(cert: Path | None, key: Path | None, cert_flag: str, key_flag: str) -> None:
    if (cert is None) != (key is None):
        given, missing = (cert_flag, key_flag) if key is None else (key_flag, cert_flag)
        raise TlsError(f"{given} needs {missing}: give both or neither")


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """A server's certificate (chain) and key; `client_ca` set: client certificates required."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """Credentials that follow the files: replaced certificates serve new connections
        (tls_reload.py)."""
        # Checked again: gRPC reports a file replaced by garbage since the config was built only
        # as a port it could not bind.
        server_tls(self.cert, self.key, self.client_ca)
        return WatchedCertificates(self.cert, self.key, self.client_ca).grpc_credentials()


def server_tls(cert: Path | None, key: Path | None, client_ca: Path | None = None) -> ServerTls | None:
    """Checks the server flags and their files; None when TLS is off (no --tls-cert/--tls-key)."""
    _pair(cert, key, "--tls-cert", "--tls-key")
    if cert is None:
        if client_ca is not None:
            raise TlsError("--tls-client-ca needs --tls-cert and --tls-key: client certificates are checked "
                           "only over TLS")
        return None
    _check_pair(cert, key, "--tls-cert", "--tls-key")
    if client_ca is not None:
        _check_certificates(client_ca, "--tls-client-ca")
    return ServerTls(Path(cert), Path(key), None if client_ca is None else Path(client_ca))


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """How a client verifies servers (`ca`; None: the system's roots) and what it presents."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    #: The name checked against the server's certificate instead of the dialled host
    #: (grpc.ssl_target_name_override): a probe of 127.0.0.1 inside a container whose
    #: certificate names its service.
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "--tls-ca") if self.ca else None,
            private_key=_read(self.key, "--tls-client-key") if self.key else None,
            certificate_chain=_read(self.cert, "--tls-client-cert") if self.cert else None)

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def ssl_context(self) -> ssl.SSLContext:
        """The same settings for an HTTPS client (httpx `verify=`)."""
        context = ssl.create_default_context(cafile=str(self.ca) if self.ca else None)
        if self.cert is not None:
            context.load_cert_chain(self.cert, self.key)
        return context


def client_tls(ca: Path | None, cert: Path | None = None, key: Path | None = None,
               server_name: str = "") -> ClientTls | None:
    """Checks the client flags and their files; None when calls go in clear text (neither
    --tls-ca nor --tls-client-cert given)."""
    _pair(cert, key, "--tls-client-cert", "--tls-client-key")
    if ca is None and cert is None:
        return None
    if ca is not None:
        _check_certificates(ca, "--tls-ca")
    if cert is not None:
        _check_pair(cert, key, "--tls-client-cert", "--tls-client-key")
    return ClientTls(*(None if p is None else Path(p) for p in (ca, cert, key)), server_name=server_name)


def channel(address: str, tls: ClientTls | None, options: Options = ()) -> grpc.Channel:
    """A blocking channel: TLS when `tls` is given, clear text otherwise."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.credentials(), options=[*options, *tls.options()])


def aio_channel(address: str, tls: ClientTls | None, options: Options = ()) -> grpc.aio.Channel:
    """An asyncio channel (create it inside the loop that uses it): TLS when `tls` is given,
    following its files when they are replaced (tls_channel.py: client certificate and CA
    rotation without a restart)."""
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options))
    settings = [*options, *tls.options()]
    return RotatingChannel(lambda: grpc.aio.secure_channel(address, tls.credentials(), options=settings),
                           [tls.ca, tls.cert, tls.key], lambda: client_tls(tls.ca, tls.cert, tls.key, tls.server_name))


def add_port(server: grpc.aio.Server, address: str, tls: ServerTls | None) -> int:
    """Binds `address`, TLS only when `tls` is given; the port bound (0 when binding failed)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.credentials())


def grpcurl_flags(client_tls: ClientTls | None) -> str:
    """grpcurl's flags to reach services with these client settings: -plaintext, or the CA (and
    the client certificate)."""
    if client_tls is None:
        return "-plaintext"
    flags = [] if client_tls.ca is None else ["-cacert", str(client_tls.ca)]
    if client_tls.cert is not None:
        flags += ["-cert", str(client_tls.cert), "-key", str(client_tls.key)]
    return shlex.join(flags)
