"""Certificate rotation without a restart: servers pick up replaced certificate, key and
client-CA files for new connections.

Certificates expire (cert-manager and ACME renew them every few weeks), and restarting every
service to rotate one would drop its streams and, for an inference node, its warm adapter pool.
So a server watches its files: gRPC asks for the current certificate before each handshake
(`grpc.dynamic_ssl_server_credentials`), the HTTPS API checks every few seconds. Connections
already open keep the certificate they were made with.

A rotation writes two files, rarely at the same instant: a new certificate read with the old
key, or a half-written file, does not parse or match, and the server keeps the last good pair
(logging why) until the files are consistent again. Each candidate is read once into a private
folder and checked there, so what was checked is exactly what gets served.
"""

from __future__ import annotations

import contextlib
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc

log = logging.getLogger("loraplex.tls")

#: How often, at most, a handshake looks at the files (one stat() each): a burst of new
#: connections should not become a burst of file reads.
CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class PemSet:
    """The bytes of one consistent set of files, checked together."""

    cert: bytes
    key: bytes
    client_ca: bytes | None


def file_stamp(paths: list[Path]) -> tuple:
    """What changes when a file is rewritten or replaced by a rename (as Kubernetes' secret
    volumes and cert-manager do): inode, size and modification time."""
    stamps = []
    for path in paths:
        try:
            stat = path.stat()
        except OSError:
            stamps.append(None)
        else:
            stamps.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(stamps)


class WatchedCertificates:
    """A server's certificate, key and optional client CA, re-read when they change.

    `current()` is the last set that passed the checks; `refresh()` looks at the files (at most
    once per CHECK_INTERVAL_S unless forced) and returns a new PemSet when they changed and
    are valid, else None. Thread-safe: gRPC calls it from its own threads.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), None if client_ca is None else Path(client_ca)
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._stamp = file_stamp(self._paths)
        self._current = load_checked(self.cert, self.key, self.client_ca)
        self._rejected_stamp: tuple | None = None
        self.reloads = 0

    @property
    def _paths(self) -> list[Path]:
        return [self.cert, self.key] + ([self.client_ca] if self.client_ca is not None else [])

    def current(self) -> PemSet:
        with self._lock:
            return self._current

    def refresh(self, force: bool = False) -> PemSet | None:
        with self._lock:
            now = time.monotonic()
            if not force and now - self._checked_at < CHECK_INTERVAL_S:
                return None
            self._checked_at = now
            stamp = file_stamp(self._paths)
            if stamp == self._stamp or stamp == self._rejected_stamp:
                return None
            try:
                candidate = load_checked(self.cert, self.key, self.client_ca)
            except ValueError as exc:
                self._rejected_stamp = stamp  # logged once per bad state, not per handshake
                log.error("TLS files changed but cannot be used, still serving the previous certificate: %s", exc)
                return None
            self._stamp, self._rejected_stamp, self._current = stamp, None, candidate
            self.reloads += 1
            log.info("TLS certificate reloaded from %s", self.cert)
            return candidate

    # --- gRPC ---
    def grpc_credentials(self) -> grpc.ServerCredentials:
        """Credentials that ask for the files' current state before each TLS handshake."""
        return grpc.dynamic_ssl_server_credentials(
            _grpc_configuration(self.current()), lambda: self._grpc_fetch(),
            require_client_authentication=self.client_ca is not None)

    def _grpc_fetch(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            fresh = self.refresh()
        except Exception:  # an exception here would fail the handshake; keep the old pair instead
            log.exception("checking the TLS files failed")
            return None
        return None if fresh is None else _grpc_configuration(fresh)

    # --- HTTPS ---
    def load_into(self, context: ssl.SSLContext, pems: PemSet) -> None:
        """Puts this certificate and key into a live server context: connections accepted from
        now on present them (OpenSSL copies the context's pair into each new connection)."""
        with _private_files(pems) as (cert, key):
            context.load_cert_chain(cert, key, password=b"")


def _grpc_configuration(pems: PemSet) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(pems.key, pems.cert)], root_certificates=pems.client_ca)


def _read(path: Path, flag: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None


def load_checked(cert: Path, key: Path, client_ca: Path | None) -> PemSet:
    """Reads the files once and checks those bytes: certificates parse, the key is unencrypted
    and matches the certificate. ValueError naming the file otherwise."""
    pems = PemSet(_read(cert, "--tls-cert"), _read(key, "--tls-key"),
                  None if client_ca is None else _read(client_ca, "--tls-client-ca"))
    if b"ENCRYPTED" in pems.key:
        raise ValueError(f"--tls-key {key}: the private key is encrypted")
    with _private_files(pems) as (cert_copy, key_copy):
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_copy, key_copy, password=b"")
        except ssl.SSLError as exc:
            what = "does not match the certificate" if exc.reason == "KEY_VALUES_MISMATCH" else \
                "not a PEM certificate and key"
            raise ValueError(f"--tls-key {key} / --tls-cert {cert}: {what} ({exc})") from None
    if pems.client_ca is not None:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
                cadata=pems.client_ca.decode("ascii", errors="replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise ValueError(f"--tls-client-ca {client_ca}: not a PEM certificate file ({exc})") from None
    return pems


@contextlib.contextmanager
def _private_files(pems: PemSet) -> Iterator[tuple[str, str]]:
    """The pair as files only this process can read (ssl loads certificates from paths)."""
    with tempfile.TemporaryDirectory(prefix="loraplex-tls-") as folder:
        paths = []
        for name, data in (("cert.pem", pems.cert), ("key.pem", pems.key)):
            path = os.path.join(folder, name)
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
                out.write(data)
            paths.append(path)
        yield paths[0], paths[1]
