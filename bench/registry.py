"""Registry benchmark: upload/download MB/s of a 100 MiB adapter on each blob store, and
ResolveDeployment latency with 10,000 adapters (and deployments) registered, on SQLite and
PostgreSQL. Prints one JSON object.

    .venv/bin/python -m bench.registry [--size-mb 100] [--adapters 10000] [--resolves 3000]

The registry runs as its own process (`python -m services.registry`), so client and server do
not share a GIL. PostgreSQL is a private throwaway cluster (fsync off) and S3 is moto's server,
both started here exactly as the tests start them (tests/registry/backends.py): the S3 figures
measure our path through the minio client against a local Python S3 server, not MinIO itself.
The 10,000 adapters and deployments for the resolve test are bulk-inserted as rows (resolve
reads rows only; uploading 10,000 adapters would measure validation, which the first part does).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import numpy as np
from safetensors.numpy import save_file

from bench.machine import describe
from services.common.pb.loraplex.registry.v1 import registry_pb2 as pb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.stack import health_status
from services.registry.db import Database
from services.registry.db.models import Adapter, ApiKey, Deployment, Tenant, utcnow
from tests.conftest import free_port
from tests.registry.backends import MotoS3, PostgresCluster

ADMIN = "bench-admin"
MiB = 1024 * 1024
# A Llama-3-8B-shaped base (config.json is all the registry reads).
BASE_CONFIG = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
               "max_position_embeddings": 8192}
SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024), "o_proj": (4096, 4096),
          "gate_proj": (4096, 14336), "up_proj": (4096, 14336), "down_proj": (14336, 4096)}


def machine() -> dict:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {**describe(), "memory_gib": round(memory, 1), "grpcio": grpc.__version__}


class RegistryProcess:
    def __init__(self, workdir: Path, *flags: str) -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log = open(workdir / f"registry-{self.port}.log", "wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "services.registry", "--port", str(self.port), "--metrics-port", "0",
             "--admin-token", ADMIN, "--log-level", "WARNING", "--data-dir", str(workdir / f"data-{self.port}"),
             *flags], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while health_status(self.address) != "SERVING":
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"registry did not start; see {self.log.name}")
            time.sleep(0.1)
        self.channel = grpc.insecure_channel(self.address, options=[("grpc.max_receive_message_length", 64 * MiB),
                                                                    ("grpc.max_send_message_length", 64 * MiB)])
        self.stub = registry_pb2_grpc.RegistryStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.process.terminate()
        self.process.wait(30)
        self.log.close()


def auth(token: str = ADMIN):
    return [("authorization", f"Bearer {token}")]


def make_adapter(workdir: Path, size_mb: int) -> tuple[bytes, Path]:
    """An fp32 all-module adapter for BASE_CONFIG whose rank makes it about size_mb MiB."""
    per_rank = sum(i + o for i, o in SHAPES.values()) * BASE_CONFIG["num_hidden_layers"] * 4
    rank = max(1, round(size_mb * MiB / per_rank))
    rng = np.random.default_rng(0)
    tensors = {}
    for layer in range(BASE_CONFIG["num_hidden_layers"]):
        for module, (fan_in, fan_out) in SHAPES.items():
            parent = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (rng.standard_normal((rank, fan_in), np.float32) * 0.01)
            tensors[f"{prefix}.lora_B.weight"] = (rng.standard_normal((fan_out, rank), np.float32) * 0.01)
    path = workdir / "adapter_model.safetensors"
    save_file(tensors, path)
    config = json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(SHAPES),
                         "task_type": "CAUSAL_LM", "base_model_name_or_path": "bench-8b"}).encode()
    return config, path


def upload(stub, config: bytes, weights: bytes, tenant: str, name: str) -> tuple[float, pb.Adapter]:
    header = pb.UploadAdapterHeader(tenant=tenant, name=name, base_model="bench-8b", archive=pb.ADAPTER_ARCHIVE_FILES,
                                    files=[pb.UploadFile(filename="adapter_config.json", size_bytes=len(config)),
                                           pb.UploadFile(filename="adapter_model.safetensors",
                                                         size_bytes=len(weights))])
    body = config + weights

    def messages():
        yield pb.UploadAdapterRequest(header=header)
        view = memoryview(body)
        for start in range(0, len(body), MiB):
            yield pb.UploadAdapterRequest(chunk=bytes(view[start:start + MiB]))

    started = time.perf_counter()
    response = stub.UploadAdapter(messages(), metadata=auth(), timeout=600)
    return time.perf_counter() - started, response.adapter


def download(stub, adapter_id: str, chunk_size: int) -> tuple[float, int]:
    started, size = time.perf_counter(), 0
    for message in stub.DownloadAdapter(pb.DownloadAdapterRequest(id=adapter_id, chunk_size=chunk_size),
                                        metadata=auth(), timeout=600):
        size += len(message.chunk)
    return time.perf_counter() - started, size


def bench_store(workdir: Path, flags: list[str], config: bytes, weights_path: Path, runs: int) -> dict:
    registry = RegistryProcess(workdir, *flags)
    try:
        stub = registry.stub
        stub.CreateTenant(pb.CreateTenantRequest(name="bench"), metadata=auth())
        stub.RegisterBaseModel(pb.RegisterBaseModelRequest(name="bench-8b", location=str(workdir / "base")),
                               metadata=auth())
        weights = bytearray(weights_path.read_bytes())
        mb = len(weights) / MiB
        uploads, downloads, downloads_4m, adapter = [], [], [], None
        for run in range(runs):
            weights[-4:] = run.to_bytes(4, "little")  # new content each run: a real write, not a dedup hit
            seconds, adapter = upload(stub, config, bytes(weights), "bench", f"big-{run}")
            uploads.append(mb / seconds)
            seconds, size = download(stub, adapter.id, MiB)
            assert size == len(weights)
            downloads.append(mb / seconds)
            downloads_4m.append(mb / download(stub, adapter.id, 4 * MiB)[0])
        result = {"adapter_mib": round(mb, 1), "runs": runs,
                  "store_put_mb_s": round(store_put(flags, workdir, mb), 1),
                  "upload_mb_s": round(statistics.median(uploads), 1),
                  "download_mb_s_1mib_chunks": round(statistics.median(downloads), 1),
                  "download_mb_s_4mib_chunks": round(statistics.median(downloads_4m), 1)}
        if "s3" in flags:
            result["presigned_get_mb_s"] = round(presigned_get(flags, adapter.sha256, mb), 1)
        return result
    finally:
        registry.close()


def open_store(flags: list[str], workdir: Path):
    from services.registry.blobstore import LocalBlobStore, S3BlobStore

    values = dict(zip(flags[::2], flags[1::2]))
    if values.get("--blob-store") != "s3":
        return LocalBlobStore(workdir / "store-alone")
    return S3BlobStore(values["--s3-endpoint"], values["--s3-bucket"], "bench", "bench", region="us-east-1",
                       secure=False, part_size=16 * MiB)


def store_put(flags: list[str], workdir: Path, mb: float) -> float:
    """The blob store alone putting the weights (no gRPC, no validation): the floor under uploads."""
    store = open_store(flags, workdir)
    store.start()
    source = workdir / "store-alone.bin"
    # A freshly written file, like validated weights: the figure includes the same fsync.
    source.write_bytes((workdir / "adapter_model.safetensors").read_bytes())
    started = time.perf_counter()
    store.put_file("bench/store-alone", source)
    return mb / (time.perf_counter() - started)


def presigned_get(flags: list[str], sha256: str, mb: float) -> float:
    """What a node would get fetching the object directly (presigned URL) instead of over gRPC."""
    store = open_store(flags, Path())
    url = store.presigned_url(f"adapters/{sha256}", 600)
    rates = []
    for _ in range(3):
        started = time.perf_counter()
        with urllib.request.urlopen(url) as response:
            while response.read(MiB):
                pass
        rates.append(mb / (time.perf_counter() - started))
    return statistics.median(rates)


def seed_rows(url: str, count: int, tenants: int) -> tuple[list[tuple[str, str]], str]:
    """count adapters + deployments spread over tenants; returns [(deployment, tenant id)], a tenant key."""
    from services.registry.auth import hash_secret
    from sqlalchemy import insert

    db, now, rows = Database(url), utcnow(), []
    secret = "lpx_bench-" + uuid.uuid4().hex
    with db.write() as session:
        tenant_ids = [f"tnt_{uuid.uuid4().hex}" for _ in range(tenants)]
        session.execute(insert(Tenant), [{"id": t, "name": f"t{i}", "display_name": "", "created_at": now}
                                         for i, t in enumerate(tenant_ids)])
        session.execute(insert(ApiKey), [{"id": "key_bench", "tenant_id": tenant_ids[0], "name": "bench",
                                          "prefix": secret[:12], "secret_sha256": hash_secret(secret),
                                          "created_at": now}])
        adapters, deployments = [], []
        for i in range(count):
            tenant = tenant_ids[i % tenants]
            sha = hashlib.sha256(str(i).encode()).hexdigest()
            adapters.append({"id": f"adp_{uuid.uuid4().hex}", "tenant_id": tenant, "name": f"a{i // tenants}",
                             "version": 1, "base_model": "bench-8b", "rank": 8, "alpha": 16.0, "use_rslora": False,
                             "scaling": 2.0, "target_modules": ["q_proj", "v_proj"], "size_bytes": 1, "sha256": sha,
                             "content_digest": sha, "config_json": "{}", "description": "", "labels": {},
                             "created_at": now})
            name = f"model-{i}"
            deployments.append({"name": name, "tenant_id": tenant, "base_model": "bench-8b",
                                "adapter_name": f"a{i // tenants}", "adapter_version": i % 2, "created_at": now,
                                "updated_at": now})
            rows.append((name, tenant))
        session.execute(insert(Adapter), adapters)
        session.execute(insert(Deployment), deployments)
    db.close()
    return rows, secret


def bench_resolve(workdir: Path, url: str, flags: list[str], count: int, resolves: int) -> dict:
    registry = RegistryProcess(workdir, "--database-url", url, *flags)
    try:
        registry.stub.RegisterBaseModel(pb.RegisterBaseModelRequest(name="bench-8b", location=str(workdir / "base")),
                                        metadata=auth())
        rows, secret = seed_rows(url, count, tenants=100)
        rng = random.Random(0)
        latencies = {"router_admin_token": [], "tenant_key": []}
        own = [row for row in rows if row[1] == rows[0][1]]
        for _ in range(resolves):
            name, tenant = rng.choice(rows)
            started = time.perf_counter()
            registry.stub.ResolveDeployment(pb.ResolveDeploymentRequest(name=name, tenant=tenant), metadata=auth())
            latencies["router_admin_token"].append(time.perf_counter() - started)
            name, _ = rng.choice(own)
            started = time.perf_counter()
            registry.stub.ResolveDeployment(pb.ResolveDeploymentRequest(name=name), metadata=auth(secret))
            latencies["tenant_key"].append(time.perf_counter() - started)
        result = {"adapters": count, "deployments": count, "resolves": resolves}
        for label, values in latencies.items():
            values.sort()
            result[label] = {"p50_ms": round(values[len(values) // 2] * 1000, 2),
                             "p99_ms": round(values[int(len(values) * 0.99)] * 1000, 2),
                             "mean_ms": round(statistics.fmean(values) * 1000, 2)}
        return result
    finally:
        registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--adapters", type=int, default=10_000)
    parser.add_argument("--resolves", type=int, default=3000)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    (workdir / "base").mkdir()
    (workdir / "base" / "config.json").write_text(json.dumps(BASE_CONFIG))
    postgres, moto = PostgresCluster().start(), MotoS3(workdir / "moto.log").start()
    try:
        config, weights = make_adapter(workdir, args.size_mb)
        s3 = ["--blob-store", "s3", "--s3-endpoint", moto.endpoint, "--s3-bucket", "bench-blobs",
              "--s3-access-key", "bench", "--s3-secret-key", "bench"]
        result = {
            "benchmark": "registry",
            "machine": machine(),
            "transfer": {"local": bench_store(workdir, [], config, weights, args.runs),
                         "s3_moto": bench_store(workdir, s3, config, weights, args.runs)},
            "resolve": {"sqlite": bench_resolve(workdir, f"sqlite:///{workdir / 'resolve.db'}", [], args.adapters,
                                                args.resolves),
                        "postgresql": bench_resolve(workdir, postgres.new_database("bench"), [], args.adapters,
                                                    args.resolves)},
        }
    finally:
        moto.stop()
        postgres.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
