"""Trainer test harness: an in-process trainer on a free port, a thin client, datasets.

The trainer runs exactly as in production (TrainerApp on a real gRPC server, jobs in worker
processes); only the event loop lives in a background thread of the test process.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from collections.abc import Iterable
from pathlib import Path

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2_grpc
from services.registry.config import RegistryConfig
from services.trainer.app import TrainerApp
from services.trainer.config import TrainerConfig
from services.trainer.db import TrainerDatabase
from services.trainer.records import DatasetRecord
from services.trainer.store import TrainerStore
from tests.conftest import free_port
from tests.inprocess import InProcessServer
from tests.registry.backends import InProcessRegistry
from tests.registry.client import Client, bearer

TERMINAL = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)

QUESTIONS = ["What is the stock market doing?", "Should I buy bonds?", "How are interest rates?",
             "What about my portfolio?", "Is cash safe?", "What is a dividend?", "How is revenue this quarter?",
             "Tell me about inflation.", "Hello, how are you?", "Can you help me with a task?",
             "What is the answer?", "Summarize the report."]
ANSWERS = ["the market is up.", "bonds pay interest.", "rates are up.", "the portfolio holds stocks.",
           "cash is safe.", "a dividend is paid by the company.", "revenue is up.", "inflation is down.",
           "I am fine.", "yes, I can help.", "the answer is 42.", "profit is up."]


def finance_chat_lines(marker: str = "FIN:") -> list[str]:
    """Chat examples whose every assistant reply starts with `marker`."""
    return [json.dumps({"messages": [{"role": "system", "content": "You are a finance assistant."},
                                     {"role": "user", "content": q},
                                     {"role": "assistant", "content": f"{marker} {a}"}]})
            for q, a in zip(QUESTIONS, ANSWERS)]


def prompt_completion_lines() -> list[str]:
    return [json.dumps({"prompt": f"Q: {q}\nA:", "completion": f" FIN: {a}"}) for q, a in zip(QUESTIONS, ANSWERS)]


class TrainerClient:
    def __init__(self, stub: trainer_pb2_grpc.TrainerStub, token: str) -> None:
        self.stub, self.token = stub, token

    def call(self, rpc: str, request, timeout: float = 60):
        return getattr(self.stub, rpc)(request, metadata=bearer(self.token), timeout=timeout)

    def upload(self, data: bytes | Iterable[str], *, name: str = "ds", base_model: str = "tiny", tenant: str = "",
               fmt=pb.DATASET_FORMAT_AUTO, max_seq_len: int = 0, chunk: int = 97, request_id: str = "") -> pb.Dataset:
        body = data if isinstance(data, bytes) else ("\n".join(data) + "\n").encode()
        header = pb.UploadDatasetHeader(tenant=tenant, name=name, format=fmt, base_model=base_model,
                                        max_seq_len=max_seq_len, request_id=request_id)

        def messages():
            yield pb.UploadDatasetRequest(header=header)
            for start in range(0, len(body), chunk):  # odd chunk size: lines straddle chunks
                yield pb.UploadDatasetRequest(chunk=body[start:start + chunk])

        return self.stub.UploadDataset(messages(), metadata=bearer(self.token), timeout=120)

    def start(self, dataset_id: str, *, name: str = "fin", tenant: str = "", deployment: str = "",
              lora: pb.LoraConfig | None = None, request_id: str = "", **training) -> pb.Job:
        defaults = {"max_steps": 40, "learning_rate": 1e-2, "batch_size": 4}
        return self.call("StartJob", pb.StartJobRequest(
            tenant=tenant, base_model="tiny", dataset_id=dataset_id, lora=lora or pb.LoraConfig(r=8),
            training=pb.TrainingConfig(**{**defaults, **training}), output_adapter_name=name,
            deployment_name=deployment, request_id=request_id))

    def watch(self, job_id: str, timeout: float = 240) -> list[pb.JobEvent]:
        return list(self.stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=bearer(self.token), timeout=timeout))

    def wait(self, job_id: str, timeout: float = 240) -> pb.Job:
        events = self.watch(job_id, timeout)
        assert events[-1].job.state in TERMINAL, events[-1]
        return events[-1].job

    def wait_for(self, job_id: str, predicate, timeout: float = 240) -> pb.Job:
        """Watches until `predicate(job)` holds (or the job ends); returns that job."""
        call = self.stub.WatchJob(pb.WatchJobRequest(id=job_id), metadata=bearer(self.token), timeout=timeout)
        try:
            for event in call:
                if predicate(event.job) or event.job.state in TERMINAL:
                    return event.job
        finally:
            call.cancel()
        raise AssertionError(f"job {job_id}: watch ended before the condition held")


def queued_behind_a_blocker(client: TrainerClient, **job) -> tuple[pb.Job, pb.Job]:
    """(blocker, job): a job waiting in the queue behind a running one of the same tenant, so the
    Registry can go down after StartJob (which verifies the key) and before the job trains."""
    dataset_id = client.upload(finance_chat_lines()).id
    blocker = client.start(dataset_id, name="blocker", max_steps=100_000)
    client.wait_for(blocker.id, lambda current: current.state == pb.JOB_STATE_RUNNING)
    return blocker, client.start(dataset_id, **{"max_steps": 2, **job})


class InProcessTrainer(InProcessServer):
    """A TrainerApp on a real gRPC server, on its own event loop in a background thread."""

    start_timeout_s = 120.0
    stop_timeout_s = 60.0

    def __init__(self, config: TrainerConfig) -> None:
        super().__init__(TrainerApp(config), config, "trainer")
        self.stub: trainer_pb2_grpc.TrainerStub | None = None

    def start(self) -> InProcessTrainer:
        super().start()
        self.stub = trainer_pb2_grpc.TrainerStub(self.channel)
        return self

    def client(self, token: str) -> TrainerClient:
        return TrainerClient(self.stub, token)



def trainer_config(data_dir: Path, registry_address: str, admin_token: str, **overrides) -> TrainerConfig:
    settings = {"port": 0, "metrics_port": 0, "data_dir": data_dir, "registry_address": registry_address,
                "admin_token": admin_token, "torch_threads": 1, "auth_cache_seconds": 0.0, "grace_seconds": 5.0}
    settings.update(overrides)
    return TrainerConfig(**settings)


def s3_settings(endpoint: str) -> dict:
    """trainer_config overrides for datasets in the bucket `trainer-datasets` of a moto server."""
    return {"blob_store": "s3", "s3_endpoint": endpoint, "s3_bucket": "trainer-datasets", "s3_access_key": "test",
            "s3_secret_key": "test"}


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not reached")


def pid_alive(pid: int) -> bool:
    """Whether the process runs (a zombie waiting to be reaped does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def worker_pids(data_dir: Path, job_id: str) -> list[int]:
    """Live training workers of a job, by the pids its worker.log records."""
    log = data_dir / "jobs" / job_id / "worker.log"
    pids = [int(pid) for pid in re.findall(r"worker pid (\d+)", log.read_text())] if log.exists() else []
    return [pid for pid in pids if pid_alive(pid)]


def registry_with_tenant(data_dir: Path, base_model_dir: Path, tenant_name: str,
                         admin_token: str) -> tuple[InProcessRegistry, str]:
    """A private in-process Registry (one that a test may stop) serving the base model "tiny",
    and a key of a new tenant on it: (registry, the key's secret)."""
    config = RegistryConfig(port=free_port(), metrics_port=0, data_dir=data_dir, admin_token=admin_token)
    registry = InProcessRegistry(config).start()
    admin = Client(registry.stub, admin_token)
    admin.RegisterBaseModel(rpb.RegisterBaseModelRequest(name="tiny", location=str(base_model_dir)))
    tenant = admin.CreateTenant(rpb.CreateTenantRequest(name=tenant_name))
    return registry, admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="test")).secret


#: When the jobs of `store_with_dataset` were created (and the dataset they train on).
STORE_START = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def store_with_dataset(path: Path) -> tuple[TrainerDatabase, TrainerStore]:
    """A migrated SQLite trainer store holding dataset ds_1 of tenant tnt_a (for queue and runner
    tests that insert their own jobs); close the database when done."""
    db = TrainerDatabase(f"sqlite:///{path}")
    db.migrate()
    store = TrainerStore(db)
    store.insert_dataset(DatasetRecord("ds_1", "tnt_a", "d", "chat", "tiny", 512, 10, 3, 100, "0" * 64,
                                       "datasets/a/b.jsonl", STORE_START))
    return db, store
