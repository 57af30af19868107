"""What an operator runs into starting and stopping services: taken ports, a database that never
answers, Ctrl-C while `loraplex up` is still starting, a --data-dir that cannot be used.
Every service here is a real process on free ports."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.healthcheck import health_status
from tests.conftest import REPO_ROOT, free_port, start_module, stop_process, wait_for_health

SERVICES = ("router", "registry", "trainer", "inference")


@pytest.fixture
def silent_database() -> Iterator[str]:
    """A PostgreSQL URL whose server accepts the connection and then never says a word, as a
    database behind a firewall that drops packets does: whoever opens it waits forever."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"postgresql+psycopg://loraplex@127.0.0.1:{listener.getsockname()[1]}/loraplex"


def wait_for_text(path: Path, text: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        assert process.poll() is None, f"exited with {process.returncode}: {path.read_text(errors='replace')}"
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in {path} after {timeout}s")


def test_a_taken_metrics_port_is_named_without_a_traceback(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        metrics = blocker.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "services.registry", "--port", str(free_port()),
                                 "--metrics-port", str(metrics), "--data-dir", str(tmp_path)],
                                cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"registry cannot start: cannot serve /metrics on 127.0.0.1:{metrics}" in result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.mark.parametrize("service", ["registry", "trainer"])
def test_sigterm_ends_a_service_whose_database_never_answers(tmp_path, silent_database, service):
    port, log = free_port(), tmp_path / f"{service}.log"
    process = start_module(f"services.{service}", "--port", str(port), "--metrics-port", "0",
                           "--data-dir", str(tmp_path / "data"), "--database-url", silent_database, log=log)
    try:
        # The log names the database it waits for: the one clue while it stays NOT_SERVING.
        wait_for_text(log, f"opening database {silent_database}", process)
        assert health_status(f"127.0.0.1:{port}") == "NOT_SERVING"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0  # it waited for the database thread forever
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "stopping during warm-up" in log.read_text()


def test_up_refuses_ports_another_server_answers_on(tmp_path):
    """Another stack already SERVING on these ports: its answers must not pass for ours."""
    other = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.so_reuseport", 0)])
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, other)
    ports = {name: other.add_insecure_port("127.0.0.1:0") for name in SERVICES}
    other.start()
    try:
        args = [sys.executable, "-m", "services.cli", "up", "--data-dir", str(tmp_path / "state"),
                "--metrics-base-port", "0", "--router-http-port", str(free_port())]
        for name, port in ports.items():
            args += [f"--{name}-port", str(port)]
        result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    finally:
        other.stop(0)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "loraplex is up" not in result.stdout
    for name, port in ports.items():
        assert f"127.0.0.1:{port} ({name} gRPC)" in result.stderr
    assert not (tmp_path / "state" / "logs").exists()  # no service was started


def test_ctrl_c_stops_up_while_its_services_are_still_starting(tmp_path, silent_database):
    ports = {name: free_port() for name in SERVICES}
    args = [sys.executable, "-m", "services.cli", "up", "--data-dir", str(tmp_path / "state"),
            "--metrics-base-port", "0", "--router-http-port", str(free_port()),
            "--database-url", silent_database, "--startup-timeout", "600"]
    for name, port in ports.items():
        args += [f"--{name}-port", str(port)]
    process = subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # The registry waits for its database, so the stack cannot come up.
        wait_for_text(tmp_path / "state" / "logs" / "registry.log", "opening database", process)
        wait_for_health(f"127.0.0.1:{ports['router']}", process=process)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)  # it ignored Ctrl-C until --startup-timeout
    finally:
        stop_process(process)
    assert process.returncode == 130, out + err
    assert "loraplex is up" not in out
    assert "interrupted" in err and "registry" in err
    for name, port in ports.items():
        assert health_status(f"127.0.0.1:{port}") == "UNREACHABLE", name


def test_up_with_an_unusable_data_dir_says_so_in_one_line(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    args = [sys.executable, "-m", "services.cli", "up", "--data-dir", str(not_a_folder), "--metrics-base-port", "0"]
    for flag in ("--router-port", "--registry-port", "--trainer-port", "--inference-port", "--router-http-port"):
        args += [flag, str(free_port())]
    result = subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("loraplex up failed:") and str(not_a_folder) in result.stderr


def test_an_inference_node_without_admin_token_warns_that_it_is_open(tmp_path, tiny_model_dir):
    port, log = free_port(), tmp_path / "inference.log"
    process = start_module("services.inference", "--port", str(port), "--metrics-port", "0",
                           "--base-model", str(tiny_model_dir), log=log)
    try:
        wait_for_health(f"127.0.0.1:{port}", process=process, timeout=120)
    finally:
        assert stop_process(process, timeout=60) == 0
    assert f"WARNING loraplex.inference: no --admin-token: this node takes every call without credentials " \
           f"(anyone who reaches 127.0.0.1:{port} can run any adapter)" in log.read_text()


def test_a_database_that_never_answers_fails_within_the_connect_timeout(silent_database, monkeypatch):
    from sqlalchemy.exc import OperationalError

    from services.registry.db import session

    monkeypatch.setattr(session, "PG_CONNECT_TIMEOUT_S", 1)
    database = session.Database(silent_database)
    try:
        with pytest.raises(OperationalError, match="timeout"):  # libpq's default: waits forever
            database.migrate()
    finally:
        database.close()
