"""Fixtures shared by every test: free ports, the tiny offline model, service processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

# Triton kernels run on CPU in the tests through triton's interpreter. triton.jit decides
# interpreted vs compiled when it wraps a function (our kernels, and triton.language's own
# @jit helpers as `import triton` runs), so the variable is set here, once, before anything
# imports torch or triton: every kernel and helper is then interpreted, with no reloads or
# patching. On a machine with an NVIDIA GPU it stays unset and the same tests run compiled.
# What must compile for real (the sm_90 checks, tests/inference/sm90_compile.py) runs in a
# subprocess without it.
NVIDIA_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version")
if not any(Path(path).exists() for path in NVIDIA_DEVICE_FILES):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from services.common.tiny_model import build_model_folder

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # triton 3.6's interpreter calls int() on shape-(1,) arrays (for range() with a runtime
    # bound): numpy 2.4 refuses it (triton-lang/triton#9171, hence the numpy<2.4 pin in
    # pyproject.toml), older numpy warns on every such loop.
    config.addinivalue_line("filterwarnings", "ignore:Conversion of an array with ndim > 0 to a scalar"
                            ":DeprecationWarning:triton.runtime.interpreter")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(address: str, want: str = "SERVING", timeout: float = 60.0,
                    process: subprocess.Popen | None = None, client_tls=None) -> None:
    # Imported here: the GPU machine runs the kernel tests without our gRPC packages installed.
    from services.common.healthcheck import health_status

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process exited with {process.returncode} before {address} was {want}")
        if health_status(address, client_tls=client_tls) == want:
            return
        time.sleep(0.1)
    last = health_status(address, client_tls=client_tls)
    raise AssertionError(f"{address} not {want} after {timeout}s (last: {last})")


def stop_process(process: subprocess.Popen, timeout: float = 15.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def pids_of(module: str, port: int) -> list[int]:
    """pids of the processes started with this module and port on their command line (/proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if module.encode() in cmdline and str(port).encode() in cmdline:
                pids.append(int(entry.name))
    return pids


def start_module(module: str, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Starts `python -m <module> args...` from the repo root with output to `log` (`env`: extra
    environment variables)."""
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_model_folder(tmp_path_factory.mktemp("tiny-model") / "tiny")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1/localhost and client certificates (tests/tls_certs.py)."""
    from tests.tls_certs import make_certs

    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen]]:
    """Processes a test starts; whatever is still running at the end is stopped."""
    started: list[subprocess.Popen] = []
    yield started
    for process in started:
        stop_process(process)


@pytest.fixture(scope="session")
def triton_device() -> str:
    """Where tests launch Triton kernels: "cpu" under the interpreter, else "cuda" (compiled)."""
    try:
        import triton
    except ImportError:
        pytest.skip("triton is not installed: the Triton kernels cannot run")
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    if triton.knobs.runtime.interpret:
        assert isinstance(triton.language.standard.sum, InterpretedFunction), \
            "triton was imported before TRITON_INTERPRET=1 was set (see the top of tests/conftest.py)"
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU and TRITON_INTERPRET is not 1: the Triton kernels cannot run")
    return "cuda"
