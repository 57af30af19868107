"""`loraplex up`: the four services as separate processes on one machine.

Embedded defaults: SQLite and a local-folder blob store under --data-dir, and the tiny
offline model (built on first run) when no --base-model is given. It refuses to start when
one of its ports is taken. The stack waits until every service reports SERVING through
grpc.health.v1, prints the endpoints, and then supervises: Ctrl-C/SIGTERM stops every child
cleanly, also while they are still starting (exit 130); a child that dies stops the rest and
the command exits 1 naming it. Each child's output goes to DATA_DIR/logs/<service>.log.
With --tls-cert/--tls-key (and --tls-ca, the CA that issued them) every service serves TLS
with that one certificate and calls the others over TLS; --tls-client-ca with
--tls-client-cert/--tls-client-key adds mutual TLS. Health probes and the base model's
registration use the same settings.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from services.common import tls
from services.common.config import option
from services.common.healthcheck import health_status
from services.common.server import SUPERVISOR_PID_ENV
from services.common.stack_base_model import RegistrationFailed, register_base_model

SERVICES = ("registry", "trainer", "inference", "router")
TLS_FIELDS = ("tls_cert", "tls_key", "tls_client_ca", "tls_ca", "tls_client_cert", "tls_client_key")


@dataclasses.dataclass(frozen=True)
class StackConfig:
    """Start registry, trainer, inference and router locally with embedded defaults."""

    data_dir: Path = option(Path(".loraplex"), "state of every service (SQLite, blobs, logs, models)")
    host: str = option("127.0.0.1", "address the services listen on")
    router_port: int = option(50050, "Router gRPC port (the front door)")
    registry_port: int = option(50051, "Registry gRPC port")
    trainer_port: int = option(50052, "Trainer gRPC port")
    inference_port: int = option(50053, "Inference node gRPC port")
    router_http_port: int = option(8000, "Router's OpenAI-compatible HTTP API port (base_url http://HOST:PORT/v1)")
    metrics_base_port: int = option(9400, "router, registry, trainer, inference get this port +0..3 for "
                                          "/metrics (0 disables metrics)")
    base_model: Path | None = option(None, "Hugging Face checkpoint folder (default: the tiny test model)")
    base_model_name: str = option("base-llm", "the base model's name in the Registry (what the inference node serves)")
    admin_token: str = option("", "admin token (default: generated once, kept in DATA_DIR/admin_token)")
    database_url: str = option("", "SQLAlchemy URL shared by the Registry and the Trainer, e.g. "
                                   "postgresql+psycopg://user@host/db (default: SQLite files under DATA_DIR)")
    blob_store: str = option("local", "where adapters and datasets live: local (under DATA_DIR) or s3")
    s3_endpoint: str = option("127.0.0.1:9000", "S3/MinIO host:port (with --blob-store s3)")
    s3_bucket: str = option("loraplex", "bucket shared by the Registry (adapters) and the Trainer (datasets)")
    s3_access_key: str = option("", "S3 access key (handed to the children through their environment)")
    s3_secret_key: str = option("", "S3 secret key (handed to the children through their environment)")
    startup_timeout: float = option(120.0, "seconds to wait for every service to report SERVING")
    tls_cert: Path | None = option(None, "PEM certificate every service serves TLS with (gRPC, and HTTPS for the "
                                         "router's HTTP API); it must name --host (e.g. IP:127.0.0.1, "
                                         "DNS:localhost); needs --tls-key and --tls-ca")
    tls_key: Path | None = option(None, "PEM private key of --tls-cert (unencrypted)")
    tls_client_ca: Path | None = option(None, "PEM CA bundle: every service requires gRPC callers to present a "
                                              "client certificate it issued (mutual TLS; needs --tls-client-cert)")
    tls_ca: Path | None = option(None, "PEM CA bundle that issued --tls-cert (for a self-signed certificate, the "
                                       "certificate itself): the services and this command verify each other "
                                       "with it")
    tls_client_cert: Path | None = option(None, "PEM client certificate the services and this command present to "
                                                "each other (for --tls-client-ca)")
    tls_client_key: Path | None = option(None, "PEM private key of --tls-client-cert (unencrypted)")

    def __post_init__(self) -> None:
        ports = [self.router_port, self.registry_port, self.trainer_port, self.inference_port, self.router_http_port]
        for port in ports:
            if not 1 <= port <= 65535:
                raise ValueError(f"ports must be in 1..65535, got {port}")
        if len(set(ports)) != len(ports):
            raise ValueError(f"the service ports must differ, got {ports}")
        if self.blob_store not in ("local", "s3"):
            raise ValueError(f"--blob-store must be local or s3, got {self.blob_store!r}")
        if self.startup_timeout <= 0:
            raise ValueError("--startup-timeout must be > 0")
        if self.base_model is not None and not (self.base_model / "config.json").is_file():
            raise ValueError(f"--base-model {self.base_model} is not a checkpoint folder (no config.json)")
        tls.server_tls(self.tls_cert, self.tls_key, self.tls_client_ca)
        tls.client_tls(self.tls_ca, self.tls_client_cert, self.tls_client_key)
        if self.starts_services:
            if self.tls_cert is not None and self.tls_ca is None:
                raise ValueError("--tls-cert needs --tls-ca, the CA that issued it (for a self-signed certificate, "
                                 "the certificate itself): the services verify each other with it")
            if self.tls_ca is not None and self.tls_cert is None:
                raise ValueError("--tls-ca needs --tls-cert and --tls-key: without them the services serve clear "
                                 "text")
            if self.tls_client_ca is not None and self.tls_client_cert is None:
                raise ValueError("--tls-client-ca needs --tls-client-cert and --tls-client-key: the services "
                                 "present them to each other")

    @property
    def starts_services(self) -> bool:
        """True: the four services run here, with this config's TLS settings on both ends."""
        return True

    @property
    def client_tls(self) -> tls.ClientTls | None:
        """TLS of this command's calls (health probes, registration); None: clear text."""
        if self.tls_ca is None and self.tls_client_cert is None:
            return None
        return tls.ClientTls(self.tls_ca, self.tls_client_cert, self.tls_client_key)

    def port_of(self, service: str) -> int:
        return getattr(self, f"{service}_port")

    def metrics_port_of(self, service: str) -> int:
        offset = ("router", "registry", "trainer", "inference").index(service)
        return self.metrics_base_port + offset if self.metrics_base_port else 0


def admin_token_of(config: StackConfig) -> str:
    if config.admin_token:
        return config.admin_token
    path = config.data_dir / "admin_token"
    if not path.exists():
        path.write_text(secrets.token_urlsafe(32))
        path.chmod(0o600)
    return path.read_text().strip()


def base_model_folder(config: StackConfig) -> Path:
    if config.base_model is not None:
        return config.base_model
    folder = config.data_dir / "models" / "tiny"
    if not (folder / "config.json").is_file():
        # Imported here: torch and transformers take seconds to load, which a bad flag or a
        # taken port should not wait for (the services load them in their own processes).
        from services.common.tiny_model import build_model_folder

        print(f"building the tiny offline test model in {folder}", flush=True)
        build_model_folder(folder, preset="tiny")
    return folder


def child_commands(config: StackConfig, base_model: Path) -> dict[str, list[str]]:
    """The command line of each service process (secrets go in child_environment)."""
    registry = f"{config.host}:{config.registry_port}"
    common = {name: [sys.executable, "-m", f"services.{name}", "--host", config.host,
                     "--port", str(config.port_of(name)), "--metrics-port", str(config.metrics_port_of(name))]
              for name in SERVICES}
    common["registry"] += ["--data-dir", str(config.data_dir / "registry")]
    common["trainer"] += ["--data-dir", str(config.data_dir / "trainer"), "--registry-address", registry]
    for name in ("registry", "trainer"):  # the database URL, which may hold a password, goes by environment
        if config.blob_store == "s3":
            common[name] += ["--blob-store", "s3", "--s3-endpoint", config.s3_endpoint, "--s3-bucket", config.s3_bucket]
    common["inference"] += ["--base-model", str(base_model), "--base-model-name", config.base_model_name,
                            "--registry-address", registry]
    common["router"] += ["--registry-address", registry, "--node", f"{config.host}:{config.inference_port}",
                         "--http-port", str(config.router_http_port),
                         # the OpenAI Files and Fine-tuning API (/v1/files, /v1/fine_tuning/jobs)
                         "--trainer-address", f"{config.host}:{config.trainer_port}"]
    return common


def child_environment(config: StackConfig, admin_token: str) -> dict[str, str]:
    """Every child's environment: the admin token, the S3 keys and the database URL (whose
    password any local user could otherwise read in `ps` output or /proc/PID/cmdline) travel
    here, not on the command line, and a token that starts with "-" (token_urlsafe makes one
    in 64) is not taken for a flag. The URL is always set, empty meaning the embedded SQLite,
    so a LORAPLEX_DATABASE_URL inherited from our own environment never overrides ours."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORAPLEX_ADMIN_TOKEN": admin_token,
           "LORAPLEX_DATABASE_URL": config.database_url, SUPERVISOR_PID_ENV: str(os.getpid())}
    if config.blob_store == "s3":
        env.update(LORAPLEX_S3_ACCESS_KEY=config.s3_access_key, LORAPLEX_S3_SECRET_KEY=config.s3_secret_key)
    # The TLS files too, each always set (empty: off) so that none inherited from our own
    # environment applies; a service that calls no other ignores the client ones.
    for name in TLS_FIELDS:
        path = getattr(config, name)
        env[f"LORAPLEX_{name.upper()}"] = "" if path is None else str(Path(path).resolve())
    return env


def ports_in_use(config: StackConfig) -> list[str]:
    """The stack's ports some other process already listens on, each named. Checked before any
    child starts: the health probes would otherwise reach that process, and its SERVING would
    be reported as ours while our child dies on the taken port."""
    wanted = [(f"{name} gRPC", config.port_of(name)) for name in SERVICES]
    wanted.append(("router HTTP", config.router_http_port))
    wanted += [(f"{name} metrics", config.metrics_port_of(name)) for name in SERVICES if config.metrics_port_of(name)]
    taken = []
    for label, port in wanted:
        with socket.socket(socket.AF_INET6 if ":" in config.host else socket.AF_INET) as probe:
            # SO_REUSEADDR: a port whose last connections linger in TIME_WAIT (a stack just
            # stopped) is free to its next server; only a listening socket counts as taken.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((config.host, port))
            except OSError:
                taken.append(f"{config.host}:{port} ({label})")
    return taken


class Stack:
    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.children: dict[str, subprocess.Popen] = {}
        self.logs = config.data_dir / "logs"
        #: Set from a signal handler: wait_serving gives up at its next poll.
        self.stop_requested = False

    def start(self) -> None:
        if taken := ports_in_use(self.config):
            raise OSError(f"already in use: {', '.join(taken)} (another loraplex running? choose other ports "
                          "with the --*-port flags)")
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        commands = child_commands(self.config, base_model_folder(self.config))
        env = child_environment(self.config, admin_token_of(self.config))
        for name, command in commands.items():
            with open(self.logs / f"{name}.log", "ab") as log_file:
                self.children[name] = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                                       env=env, start_new_session=True)

    def dead_child(self) -> tuple[str, int] | None:
        for name, child in self.children.items():
            if child.poll() is not None:
                return name, child.returncode
        return None

    def wait_serving(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout
        pending = set(self.children)
        while pending:
            if self.stop_requested:
                raise StartInterrupted(f"stopped before every service was SERVING (waiting for "
                                       f"{', '.join(sorted(pending))})")
            if (dead := self.dead_child()) is not None:
                raise ChildDied(*dead, self.logs)
            for name in sorted(pending):
                address = f"{self.config.host}:{self.config.port_of(name)}"
                if health_status(address, client_tls=self.config.client_tls) == "SERVING":
                    pending.discard(name)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not SERVING after {self.config.startup_timeout:.0f}s: "
                                   f"{', '.join(sorted(pending))} (see {self.logs})")
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children.values():
            try:
                child.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


class StartInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM while the services were still starting."""


class ChildDied(RuntimeError):
    def __init__(self, name: str, code: int, logs: Path) -> None:
        log = logs / f"{name}.log"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""
        super().__init__(f"service {name!r} exited with status {code}; last lines of {log}:\n{tail}")
        self.name = name


def banner(config: StackConfig, admin_token_path: str) -> str:
    lines = ["loraplex is up; every service reports SERVING:"]
    for name in ("router", "registry", "trainer", "inference"):
        metrics = config.metrics_port_of(name)
        extra = f"  metrics http://{config.host}:{metrics}/metrics" if metrics else ""
        lines.append(f"  {name:<9} {config.host}:{config.port_of(name)}{extra}")
    router, registry = f"{config.host}:{config.router_port}", f"{config.host}:{config.registry_port}"
    security, scheme, sdk_env = tls.grpcurl_flags(config.client_tls), "http", ""
    if config.tls_cert is not None:  # the SDK's HTTP client (httpx) reads its CA bundle from SSL_CERT_FILE
        scheme, sdk_env = "https", f", with SSL_CERT_FILE={config.tls_ca} in its environment"
    lines += [
        f"admin token: {admin_token_path}",
        "try:",
        f"  grpcurl {security} {router} list",
        f"  grpcurl {security} {registry} describe loraplex.registry.v1.Registry",
        f"  grpcurl {security} -d '{{\"service\": \"\"}}' {router} grpc.health.v1.Health/Check",
        f"  OpenAI SDK: OpenAI(base_url=\"{scheme}://{config.host}:{config.router_http_port}/v1\", "
        f"api_key=<tenant key>){sdk_env}",
        f"logs: {config.data_dir / 'logs'}; Ctrl-C stops everything",
    ]
    return "\n".join(lines)


def run_stack(config: StackConfig) -> int:
    """Runs until SIGINT/SIGTERM (0) or until a child dies (1)."""
    stack = Stack(config)

    def request_stop(signum, frame):  # noqa: ARG001 - signal handler signature
        stack.stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stack.start()
        stack.wait_serving()
        location = register_base_model(f"{config.host}:{config.registry_port}", admin_token_of(config),
                                       config.base_model_name, base_model_folder(config),
                                       client_tls=config.client_tls)
        token_path = (config.admin_token and "(given with --admin-token or LORAPLEX_ADMIN_TOKEN)"
                      or str(config.data_dir / "admin_token"))
        print(f"base model {config.base_model_name!r} is registered in the Registry ({location})", flush=True)
        print(banner(config, token_path), flush=True)
        while not stack.stop_requested:
            if (dead := stack.dead_child()) is not None:
                raise ChildDied(*dead, stack.logs)
            time.sleep(0.2)
        print("stopping loraplex ...", flush=True)
        return 0
    except StartInterrupted as exc:
        print(f"loraplex up interrupted: {exc}; stopping the services", file=sys.stderr, flush=True)
        return 130
    # OSError: a taken port, an unusable --data-dir
    except (ChildDied, TimeoutError, OSError, RegistrationFailed) as exc:
        print(f"loraplex up failed: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
