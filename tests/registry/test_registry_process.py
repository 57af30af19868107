"""`python -m services.registry` as a process: embedded defaults, PostgreSQL + S3 from env,
and clear exits when a backend is unreachable or a flag is wrong."""

from __future__ import annotations

import os
import subprocess
import sys

import grpc

from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from tests.conftest import REPO_ROOT, free_port, start_module, stop_process, wait_for_health
from tests.registry.client import bearer, unique


def test_defaults_to_sqlite_and_local_blobs_under_the_data_dir(tmp_path, processes):
    port, data = free_port(), tmp_path / "registry"
    process = start_module("services.registry", "--port", str(port), "--metrics-port", "0", "--data-dir", str(data),
                           "--admin-token", "adm", log=tmp_path / "log")
    processes.append(process)
    wait_for_health(f"127.0.0.1:{port}", process=process)
    assert (data / "registry.db").is_file() and (data / "blobs").is_dir()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        assert stub.CreateTenant(pb.CreateTenantRequest(name="acme"), metadata=bearer("adm"), timeout=10).name == "acme"
    assert stop_process(process) == 0
    assert "sqlite" in (tmp_path / "log").read_text() and "local blob store" in (tmp_path / "log").read_text()


def test_postgres_and_s3_from_the_environment(tmp_path, postgres, moto):
    port, bucket = free_port(), unique("proc")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "LORAPLEX_DATABASE_URL": postgres.new_database("proc"),
           "LORAPLEX_BLOB_STORE": "s3", "LORAPLEX_S3_ENDPOINT": moto.endpoint, "LORAPLEX_S3_BUCKET": bucket,
           "LORAPLEX_S3_ACCESS_KEY": "k", "LORAPLEX_S3_SECRET_KEY": "s"}
    with open(tmp_path / "log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "services.registry", "--port", str(port), "--metrics-port",
                                    "0", "--data-dir", str(tmp_path / "data")], cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for_health(f"127.0.0.1:{port}", process=process)
        text = (tmp_path / "log").read_text()
        assert "postgresql+psycopg" in text and "s3 blob store" in text
        assert not (tmp_path / "data" / "registry.db").exists()
    finally:
        assert stop_process(process) == 0


def test_unreachable_database_ends_the_process_with_a_clear_message(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "services.registry", "--port", str(free_port()), "--metrics-port", "0",
         "--data-dir", str(tmp_path), "--database-url", f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/x"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "cannot open or migrate the database" in result.stderr


def test_bad_blob_store_flag_exits_2(tmp_path):
    result = subprocess.run([sys.executable, "-m", "services.registry", "--blob-store", "ftp"], cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--blob-store must be one of local, s3" in result.stderr


def test_unreachable_s3_endpoint_ends_the_process_with_a_clear_message(tmp_path):
    """The message used to end in urllib3's MaxRetryError repr, after minio's 5 retries."""
    endpoint = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "services.registry", "--port", str(free_port()), "--metrics-port", "0",
         "--data-dir", str(tmp_path), "--blob-store", "s3", "--s3-endpoint", endpoint, "--s3-bucket", "blobs"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"cannot start the s3 blob store (S3 endpoint {endpoint} bucket blobs)" in result.stderr
    assert f"S3 endpoint {endpoint} is unreachable or failing (" in result.stderr
    assert "Traceback" not in result.stderr and "MaxRetryError" not in result.stderr
