"""One serving `loraplex demo` for the e2e tests that drive a live stack (demo, README)."""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.healthcheck import health_status
from tests.e2e.demo_process import QUICK, DemoProcess, stack_flags

@dataclasses.dataclass
class ServingDemo:
    process: DemoProcess
    state: Path
    ports: dict[str, int]  # "router", "registry", "trainer", "inference", "router-http"

    @property
    def admin_token(self) -> str:
        return (self.state / "admin_token").read_text().strip()

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.ports[service]}"


@pytest.fixture(scope="session")
def serving_demo(tmp_path_factory) -> Iterator[ServingDemo]:
    """The demo in its serving mode; at the end, Ctrl-C must stop it and every service cleanly."""
    root = tmp_path_factory.mktemp("serving-demo")
    flags = stack_flags(root / "state")
    ports = {flag.removeprefix("--").removesuffix("-port"): int(value)
             for flag, value in zip(flags[2::2], flags[3::2]) if flag.endswith("-port")}
    demo = DemoProcess(*flags, *QUICK, log=root / "demo.log")
    try:
        demo.wait_for_line("Ctrl-C stops the demo", timeout=600)
        serving = ServingDemo(demo, root / "state", ports)
        yield serving
        demo.process.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 0, demo.output
        assert "stopping" in demo.output
        for service in ("router", "registry", "trainer", "inference"):
            assert health_status(serving.address(service)) == "UNREACHABLE", service
    finally:
        demo.kill()
