"""Real backends for registry tests and the benchmark: a private PostgreSQL cluster, moto's
S3 server, and a Registry app running in-process on a free port.

PostgreSQL refuses to run as root, so when the tests run as root the cluster is created and
started as the `postgres` user (runuser/su) in a folder that user owns; otherwise as the
current user. fsync is off: these clusters are throwaway.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.registry.app import RegistryApp
from services.registry.config import RegistryConfig
from tests.conftest import free_port
from tests.inprocess import InProcessServer


def _pg_bindir() -> Path:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not candidates:
        raise RuntimeError("PostgreSQL is not installed (no pg_ctl on PATH or in /usr/lib/postgresql/*/bin)")
    return Path(candidates[-1]).parent


class PostgresCluster:
    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="loraplex-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.as_postgres = os.geteuid() == 0
        self._count = 0

    def _run(self, *args: str) -> None:
        command = [str(self.bindir / args[0]), *args[1:]]
        if self.as_postgres:
            runner = shutil.which("runuser")
            command = [runner, "-u", "postgres", "--", *command] if runner else \
                ["su", "postgres", "-c", " ".join(f"'{part}'" for part in command)]
        result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({result.returncode}): {result.stdout}\n{result.stderr}")

    def start(self) -> PostgresCluster:
        if self.as_postgres:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync", "-D", str(self.data))
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.root / "log"), "-w", "-t", "60",
                  "start")
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, prefix: str = "registry") -> str:
        self._count += 1
        name = f"{prefix}_{self._count}_{os.getpid()}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


class MotoS3:
    """moto's S3 server as a subprocess on a free port (accepts any credentials)."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.endpoint = f"127.0.0.1:{self.port}"
        executable = Path(sys.executable).parent / "moto_server"
        self._command = [str(executable) if executable.exists() else "moto_server", "-H", "127.0.0.1",
                         "-p", str(self.port)]
        self._log = log
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30) -> MotoS3:
        with open(self._log, "wb") as out:
            self.process = subprocess.Popen(self._command, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto_server exited: {self._log.read_text()}")
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"moto_server not answering on {self.endpoint}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class InProcessRegistry(InProcessServer):
    """A RegistryApp on a real gRPC server, on its own event loop in a background thread."""

    channel_options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]

    def __init__(self, config: RegistryConfig, client_tls=None) -> None:
        super().__init__(RegistryApp(config), config, "registry", client_tls)
        self.stub: registry_pb2_grpc.RegistryStub | None = None

    def start(self) -> InProcessRegistry:
        super().start()
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)
        return self

    @property
    def ctx(self):
        return self.app.ctx


class CuttableProxy:
    """A TCP proxy in front of an S3 endpoint that can hold back responses and then drop every
    connection: what a registry sees when its store dies in the middle of a transfer (stopping
    moto instead would not do: a small object is already in the socket buffers by then)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # so the accept loop notices `cut`
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._budget: int | None = None  # response bytes still passed on; None: all
        self._sockets: list[socket.socket] = []
        self._cut = False
        threading.Thread(target=self._accept, daemon=True).start()

    def stall_after(self, response_bytes: int) -> None:
        """From now on pass on only this many more response bytes (over all connections)."""
        with self._lock:
            self._budget = response_bytes

    def cut(self) -> None:
        """Drops every connection and refuses new ones."""
        with self._lock:
            self._cut = True
            for sock in [self._listener, *self._sockets]:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def resume(self) -> None:
        """Accepts connections again on the same endpoint: the store is back."""
        with self._lock:
            self._listener = socket.create_server(("127.0.0.1", int(self.endpoint.rsplit(":", 1)[1])))
            self._listener.settimeout(0.1)
            self._sockets, self._cut, self._budget = [], False, None
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._cut:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.create_connection(self._upstream)
            with self._lock:
                self._sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket, response: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                with self._lock:
                    if response and self._budget is not None:
                        data, self._budget = data[:self._budget], self._budget - len(data[:self._budget])
                if data:
                    target.sendall(data)
