"""`loraplex up`: all four services up as separate processes, then down, as a user runs it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.common.stack import health_status
from tests.conftest import REPO_ROOT, free_port, pids_of, stop_process

NAMES = ("router", "registry", "trainer", "inference")


def start_up(tmp_path: Path, ports: dict[str, int], *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "services.cli", "up", "--data-dir", str(tmp_path / "state"),
            "--metrics-base-port", "0", "--router-http-port", str(free_port()), *extra]
    for name, port in ports.items():
        args += [f"--{name}-port", str(port)]
    return subprocess.Popen(args, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def read_until(process: subprocess.Popen, marker: str, timeout: float = 120) -> str:
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line and process.poll() is not None:
            break
        seen.append(line)
        if marker in line:
            return "".join(seen)
    raise AssertionError(f"no {marker!r} in output: {''.join(seen)} / {process.stderr.read()}")


def child_pid(port: int, module: str) -> int:
    """pid of the service process started with this module and port."""
    pids = pids_of(module, port)
    assert pids, f"no process for {module} on port {port}"
    return pids[0]


@pytest.fixture
def ports() -> dict[str, int]:
    return {name: free_port() for name in NAMES}


def test_up_serves_all_four_then_stops_them_on_sigterm(tmp_path, ports):
    process = start_up(tmp_path, ports)
    try:
        banner = read_until(process, "Ctrl-C stops everything")
        for name in NAMES:
            assert f"127.0.0.1:{ports[name]}" in banner
            assert health_status(f"127.0.0.1:{ports[name]}") == "SERVING"
        assert "grpcurl -plaintext" in banner
        assert (tmp_path / "state" / "models" / "tiny" / "config.json").is_file()
        token = (tmp_path / "state" / "admin_token")
        assert token.is_file() and oct(token.stat().st_mode & 0o777) == "0o600"
        pids = [child_pid(ports[name], f"services.{name}") for name in NAMES]
    finally:
        assert stop_process(process, timeout=30) == 0
    for name in NAMES:
        assert health_status(f"127.0.0.1:{ports[name]}") == "UNREACHABLE"
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    logs = tmp_path / "state" / "logs"
    assert all("stopped" in (logs / f"{name}.log").read_text() for name in NAMES)


def test_up_exits_non_zero_naming_a_child_that_died(tmp_path, ports):
    process = start_up(tmp_path, ports)
    try:
        read_until(process, "Ctrl-C stops everything")
        os.kill(child_pid(ports["trainer"], "services.trainer"), signal.SIGKILL)
        process.wait(timeout=30)
        assert process.returncode == 1
        assert "service 'trainer' exited with status -9" in process.stderr.read()
    finally:
        stop_process(process)
    for name in NAMES:
        assert health_status(f"127.0.0.1:{ports[name]}") == "UNREACHABLE"


def test_services_stop_on_their_own_when_up_is_killed_outright(tmp_path, ports):
    """SIGKILL (or the OOM killer) gives `up` no chance to stop its children, each in a session
    of its own: they must notice and stop, not keep serving on their ports with nobody to stop them."""
    process = start_up(tmp_path, ports)
    pids = []
    try:
        read_until(process, "Ctrl-C stops everything")
        pids = [child_pid(ports[name], f"services.{name}") for name in NAMES]
        process.kill()
        process.wait(timeout=30)
        deadline = time.monotonic() + 60
        while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()], "services outlived their supervisor"
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    logs = tmp_path / "state" / "logs"
    for name in NAMES:
        log = (logs / f"{name}.log").read_text()
        assert "its supervisor" in log and "is gone; stopping" in log and "stopped" in log, name


def test_up_rejects_bad_flags(tmp_path):
    result = subprocess.run([sys.executable, "-m", "services.cli", "up", "--router-port", "70000"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "ports must be in 1..65535" in result.stderr
    result = subprocess.run([sys.executable, "-m", "services.cli", "up", "--base-model", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "is not a checkpoint folder" in result.stderr


def test_up_names_a_service_whose_port_is_taken(tmp_path, ports):
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", ports["registry"]))
        blocker.listen()
        process = start_up(tmp_path, ports)
        process.wait(timeout=120)
    assert process.returncode == 1
    assert f"already in use: 127.0.0.1:{ports['registry']} (registry gRPC)" in process.stderr.read()


def test_state_flags_reach_registry_and_trainer_and_secrets_stay_off_the_command_line(tmp_path):
    from services.common.stack import StackConfig, child_commands

    config = StackConfig(data_dir=tmp_path, database_url="postgresql+psycopg://u@db/x", blob_store="s3",
                         s3_endpoint="minio:9000", s3_bucket="b", s3_access_key="AK", s3_secret_key="SECRET")
    commands = child_commands(config, tmp_path / "model")
    for name in ("registry", "trainer"):
        line = " ".join(commands[name])
        assert "--database-url" not in line and "--blob-store s3" in line  # the URL goes by environment
        assert "--s3-endpoint minio:9000 --s3-bucket b" in line
    assert not any("SECRET" in arg or "AK" == arg for command in commands.values() for arg in command)
    assert "--base-model-name base-llm" in " ".join(commands["inference"])
    assert "--trainer-address 127.0.0.1:50052" in " ".join(commands["router"])  # /v1/fine_tuning is on
    embedded = child_commands(StackConfig(data_dir=tmp_path), tmp_path / "model")
    assert not any(arg in ("--database-url", "--blob-store") for arg in embedded["registry"])


def test_the_admin_token_reaches_children_by_environment_even_when_it_starts_with_a_dash(tmp_path):
    """A generated token may start with "-"; on a command line argparse took it for a flag."""
    from services.common.stack import StackConfig, child_commands, child_environment

    config = StackConfig(data_dir=tmp_path, blob_store="s3", s3_access_key="AK", s3_secret_key="SK")
    env = child_environment(config, "-starts-with-a-dash")
    assert env["LORAPLEX_ADMIN_TOKEN"] == "-starts-with-a-dash"
    assert (env["LORAPLEX_S3_ACCESS_KEY"], env["LORAPLEX_S3_SECRET_KEY"]) == ("AK", "SK")
    commands = child_commands(config, tmp_path / "model")
    assert not any("--admin-token" in command or "-starts-with-a-dash" in command for command in commands.values())


def test_up_with_mutual_tls_serves_every_service_over_tls(tmp_path, ports, tls_certs, tiny_model_dir):
    """One certificate for the four services; the stack's probes and the base model's
    registration reach them over mutual TLS, clear text does not."""
    files = {**tls_certs.server(mutual=True), **tls_certs.client_fields()}
    flags = [arg for name, path in files.items() for arg in (f"--{name.replace('_', '-')}", str(path))]
    process = start_up(tmp_path, ports, "--base-model", str(tiny_model_dir), *flags)
    try:
        banner = read_until(process, "Ctrl-C stops everything")
        assert "base model 'base-llm' is registered" in banner
        assert f"grpcurl -cacert {tls_certs.ca} -cert {tls_certs.client_cert}" in banner and "https://" in banner
        for name in NAMES:
            address = f"127.0.0.1:{ports[name]}"
            assert health_status(address, client_tls=tls_certs.client(with_certificate=True)) == "SERVING"
            assert health_status(address, client_tls=tls_certs.client()) == "UNREACHABLE"
            assert health_status(address) == "UNREACHABLE"
        assert "with TLS, client certificates required" in (tmp_path / "state" / "logs" / "router.log").read_text()
    finally:
        assert stop_process(process, timeout=30) == 0
