"""The demo, end to end, with all four services as real processes.

One run serves on the embedded stack (SQLite, local blobs) and is then driven the way its
printout tells a user to: the grpcurl and Python lines it prints are pasted into a shell, and a
second demo `--attach`es to the running services (as the compose `demo` service does). The
other run is `--once` on PostgreSQL + an S3 server (moto over HTTP, real minio client).
"""

from __future__ import annotations

import json
import signal
import subprocess

import sqlalchemy
from minio import Minio

from services.common.healthcheck import health_status
from tests.e2e.demo_process import QUICK, DemoProcess, shell_env, stack_flags
from tests.registry.backends import MotoS3, PostgresCluster

STEP_TITLES = ["[1/6] Starting", "[2/6] Provisioning", "[3/6] Training", "[4/6] Published", "[5/6] Concurrent",
               "[6/6] Adapter pool"]


def assert_pipeline_passed(demo: DemoProcess, requests_per_customer: int = 4) -> None:
    output = demo.output
    for title in STEP_TITLES[1:]:
        assert title in output, output
    for letter, domain in (("A", "finance"), ("B", "legal"), ("C", "healthcare")):
        assert any(f"customer {letter} {domain}" in line and line.endswith("SUCCEEDED") for line in demo.lines), output
        assert f"base-llm-with-customer{letter}-adapter -> adapter customer{letter}-{domain} v" in output
    assert "FAIL " not in output, output
    # 3 jobs + 3 x requests + 3 base-model probes + 6 isolation probes
    total = 3 + 3 * requests_per_customer + 3 + 6
    assert f"{total} of {total} checks passed" in output, output
    assert "resident adapters: 3 [" in output, output
    assert f"{3 * requests_per_customer} concurrent requests" in output


def grpc_texts(grpcurl_stdout: str) -> str:
    """grpcurl prints one JSON object per streamed message; the answer is their text deltas joined."""
    decoder, position, texts = json.JSONDecoder(), 0, []
    while position < len(grpcurl_stdout.rstrip()):
        message, position = decoder.raw_decode(grpcurl_stdout, position)
        texts.append(message.get("delta", {}).get("text", ""))
        while position < len(grpcurl_stdout) and grpcurl_stdout[position].isspace():
            position += 1
    return "".join(texts)


def run_printed(command: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120, env=shell_env())
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    return result


def printed_command(demo: DemoProcess, heading: str) -> str:
    return demo.lines[demo.lines.index(heading) + 1].strip()


def test_demo_serves_and_what_it_prints_works(serving_demo):
    demo = serving_demo.process
    assert_pipeline_passed(demo)
    assert "demo passed" not in demo.output  # it keeps serving (the fixture checks Ctrl-C at the end)
    base_url, key = demo.value("OPENAI_BASE_URL"), demo.value("OPENAI_API_KEY")
    assert base_url == f"http://{serving_demo.address('router-http')}/v1" and key.startswith("lpx_")
    grpcurl = run_printed(printed_command(demo, "grpcurl (customer A over gRPC):"))
    assert grpc_texts(grpcurl.stdout).startswith("Market brief: stocks closed higher"), grpcurl.stdout
    python = run_printed(printed_command(demo, "Python (OpenAI SDK; reads OPENAI_BASE_URL and OPENAI_API_KEY "
                                               "from the environment):"))
    assert python.stdout.startswith("Market brief: stocks closed higher"), python.stdout


def test_demo_attaches_to_running_services_as_compose_runs_it(serving_demo, tmp_path):
    """Tenants and the base model exist by now: a second run reuses them and issues fresh keys."""
    attached = DemoProcess(
        "--once", "--attach", *QUICK, "--registry-address", serving_demo.address("registry"),
        "--trainer-address", serving_demo.address("trainer"), "--router-address", serving_demo.address("router"),
        "--openai-base-url", serving_demo.process.value("OPENAI_BASE_URL"),
        "--public-router-address", "router.example:50050",
        "--base-model-location", str((serving_demo.state / "models" / "tiny").resolve()),
        f"--admin-token={serving_demo.admin_token}", log=tmp_path / "attached.log")
    try:
        assert attached.wait(timeout=600) == 0, attached.output
    finally:
        attached.kill()
    assert "[1/6] Attaching to the running services" in attached.output
    assert_pipeline_passed(attached)
    assert attached.value("OPENAI_API_KEY") != serving_demo.process.value("OPENAI_API_KEY")
    assert " router.example:50050 loraplex.router.v1.Router/Generate" in attached.output  # the public address


def test_demo_once_on_postgresql_and_s3(tmp_path):
    cluster, s3 = PostgresCluster().start(), MotoS3(tmp_path / "moto.log").start()
    try:
        database = cluster.new_database("demo")
        demo = DemoProcess("--once", *stack_flags(tmp_path / "state"), *QUICK, "--database-url", database,
                           "--blob-store", "s3", "--s3-endpoint", s3.endpoint, "--s3-bucket", "demo-bucket",
                           "--s3-access-key", "demo", "--s3-secret-key", "demo-secret", log=tmp_path / "demo.log")
        try:
            assert demo.wait(timeout=600) == 0, demo.output
        finally:
            demo.kill()
        assert_pipeline_passed(demo)
        assert demo.lines[-1] == "demo passed"
        assert not any(line.startswith("OPENAI_API_KEY=") for line in demo.lines)  # its keys die with its stack

        engine = sqlalchemy.create_engine(database)
        with engine.connect() as connection:
            def count(table: str) -> int:
                return connection.execute(sqlalchemy.text(f"SELECT count(*) FROM {table}")).scalar()

            assert (count("tenants"), count("adapters"), count("deployments")) == (3, 3, 3)
            assert (count("trainer_datasets"), count("trainer_jobs")) == (3, 3)
        engine.dispose()
        objects = [o.object_name for o in Minio(s3.endpoint, access_key="demo", secret_key="demo-secret",
                                                secure=False).list_objects("demo-bucket", recursive=True)]
        assert sum(name.startswith("datasets/") for name in objects) == 3, objects
        assert len(objects) >= 6, objects  # + the three adapters' blobs
    finally:
        s3.stop()
        cluster.stop()


def test_ctrl_c_during_training_stops_every_service(tmp_path):
    flags = stack_flags(tmp_path / "state")
    demo = DemoProcess("--once", *flags, log=tmp_path / "demo.log")
    try:
        demo.wait_for_line("[3/6] Training", timeout=300)
        demo.process.send_signal(signal.SIGINT)
        assert demo.wait(timeout=60) == 130, demo.output
    finally:
        demo.kill()
    assert "interrupted; services stopped" in demo.output
    ports = dict(zip(flags[2::2], flags[3::2]))
    for flag in ("--router-port", "--registry-port", "--trainer-port", "--inference-port"):
        assert health_status(f"127.0.0.1:{ports[flag]}") == "UNREACHABLE", flag
