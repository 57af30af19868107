"""`python -m services.router` as a real process: flags, SERVING without its dependencies,
the brief's OpenAI example through it, a clean SIGTERM, and clear errors for bad flags."""

from __future__ import annotations

import socket
import subprocess
import sys

from openai import OpenAI

from tests.conftest import REPO_ROOT, free_port, start_module, stop_process, wait_for_health
from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.harness import ADMIN_TOKEN


def test_router_process_serves_grpc_and_the_openai_api(tmp_path, world, nodes, processes):
    port, http_port = free_port(), free_port()
    log = tmp_path / "router.log"
    args = ["--port", str(port), "--http-port", str(http_port), "--metrics-port", "0",
            "--registry-address", world.registry.address, "--admin-token", ADMIN_TOKEN, "--grace-seconds", "1",
            "--tenant-max-concurrent", "8", "--tenant-quota", f"{world.b.tenant_name}:2:100000",
            "--auth-cache-seconds", "5", "--resolve-cache-seconds", "5", "--node-poll-seconds", "0.5"]
    for node in nodes:
        args += ["--node", node.address]
    process = start_module("services.router", *args, log=log)
    processes.append(process)
    wait_for_health(f"127.0.0.1:{port}", process=process)

    client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key=world.a.token)
    completion = client.chat.completions.create(
        model="base-llm-with-customerA-adapter",
        messages=[
            {"role": "system", "content": "You are a finance assistant."},
            {"role": "user", "content": "Summarize today’s stock market trends."},
        ],
    )
    print(completion.choices[0].message.content)
    assert completion.model == CUSTOMER_A_MODEL and completion.choices[0].message.content is not None
    chunks = client.chat.completions.create(model=CUSTOMER_A_MODEL, stream=True, max_tokens=5,
                                            messages=[{"role": "user", "content": "hi"}])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")

    assert stop_process(process) == 0, log.read_text()
    assert "stopped" in log.read_text()


def test_router_turns_serving_without_registry_or_nodes(tmp_path, processes):
    port, http_port = free_port(), free_port()
    process = start_module("services.router", "--port", str(port), "--http-port", str(http_port),
                           "--metrics-port", "0", "--registry-address", f"127.0.0.1:{free_port()}",
                           log=tmp_path / "log")
    processes.append(process)
    wait_for_health(f"127.0.0.1:{port}", process=process)
    client = OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="lpx_x", max_retries=0)
    try:
        client.models.list()
    except Exception as exc:  # noqa: BLE001 - the type is what we check
        assert getattr(exc, "status_code", None) == 503 and "registry" in str(exc)
    else:
        raise AssertionError("expected 503 while the registry is unreachable")


def test_bad_flags_and_a_taken_http_port_exit_with_a_message(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "services.router", "--metrics-port", "0", *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=60)

    for args, message in [(["--tenant-quota", "acme:1"], "--tenant-quota must be TENANT:CONCURRENT"),
                          (["--load-balance-factor", "0.5"], "--load-balance-factor must be >= 1.0"),
                          (["--http-port", "70000"], "--http-port must be in -1..65535"),
                          (["--registry-address", "nowhere"], "--registry-address must be host:port")]:
        result = run(*args)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        result = run("--port", str(free_port()), "--http-port", str(taken))
    assert result.returncode == 1 and f"cannot listen on 127.0.0.1:{taken} for the HTTP API" in result.stderr
