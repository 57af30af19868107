"""`loraplex demo` stopped by SIGTERM (kill, systemd, `timeout`) before it serves: its services
must stop with it, as they do on Ctrl-C. They run in their own sessions, so nothing else
would ever stop them."""

from __future__ import annotations

import os
import signal

from services.common.healthcheck import health_status
from tests.conftest import pids_of
from tests.e2e.demo_process import QUICK, DemoProcess, stack_flags

SERVICES = ("router", "registry", "trainer", "inference")


def service_pids(ports: dict[str, int]) -> list[int]:
    """pids of the service processes started on these ports."""
    return [pid for name, port in ports.items() for pid in pids_of(f"services.{name}", port)]


def test_sigterm_during_the_pipeline_stops_the_services(tmp_path):
    flags = stack_flags(tmp_path / "state")
    ports = {name: int(flags[flags.index(f"--{name}-port") + 1]) for name in SERVICES}
    demo = DemoProcess(*flags, *QUICK, "--once", log=tmp_path / "demo.log")
    try:
        demo.wait_for_line("[2/6] Provisioning", timeout=600)
        demo.process.send_signal(signal.SIGTERM)
        code = demo.wait(timeout=120)
        left = {name: health_status(f"127.0.0.1:{port}") for name, port in ports.items()}
    finally:
        demo.kill()
        for pid in service_pids(ports):  # what the demo left behind, so the run does not leak it
            os.kill(pid, signal.SIGKILL)
    assert code == 130, demo.output
    assert "interrupted; services stopped" in demo.output
    assert set(left.values()) == {"UNREACHABLE"}, left
