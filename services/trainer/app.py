"""The Trainer process: config -> database, blob store, Registry client, queue -> servicer.

Start-up (`start`, before the health service says SERVING): clear upload spools a crash left,
migrate the database, start the dataset blob store, start the workers' fork server, requeue
jobs a previous process left running, start dispatching, then follow the Registry's change
feed to purge deleted tenants and drop revoked keys (feed.py). The Registry is not needed to
start (it is asked per request and the feed watcher retries), so the trainer comes up in any
order with the other services. Shutdown (`close`): the feed watcher stops, running jobs
checkpoint and go back to the queue (see queue.py), then connections close.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor

import grpc

from services.common.errors import Unavailable
from services.common.feed_cache import FeedState
from services.common.pb.loraplex.trainer.v1 import trainer_pb2_grpc
from services.common.services import TRAINER
from services.trainer.auth import Authenticator
from services.trainer.base_models import BaseModels
from services.trainer.blobs import open_dataset_store
from services.trainer.orphans import sweep_forever
from services.trainer.config import TrainerConfig
from services.trainer.datasets import DatasetService
from services.trainer.db import TrainerDatabase
from services.trainer.events import EventHub
from services.trainer.feed import TenantDeletionWatcher
from services.trainer.jobs import JobService
from services.trainer.outage import OutageWait
from services.trainer.publish import Publisher
from services.trainer.queue import JobQueue
from services.trainer.registry_client import RegistryClient
from services.trainer.runner import JobRunner, RunnerEnv, clear_job_folder
from services.trainer.servicer import TrainerDomain, TrainerServicer
from services.trainer.store import TrainerStore
from services.trainer.tenants import TenantPurger
from services.trainer.worker.launcher import warm_up

log = logging.getLogger("loraplex.trainer")
#: Blocking work runs here: SQL, blob I/O, dataset validation (tokenizing).
WORKER_THREADS = 8


class TrainerApp:
    service_names = [TRAINER.full_name]

    def __init__(self, config: TrainerConfig) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="trainer")
        self.servicer = TrainerServicer()
        self.db: TrainerDatabase | None = None
        self.queue: JobQueue | None = None
        self.registry: RegistryClient | None = None
        self.feed_task: asyncio.Task | None = None
        #: Kept by the feed watcher, read by the auth caches: trusted only while the feed is live.
        self.feed_state = FeedState()
        self.sweep_task: asyncio.Task | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        trainer_pb2_grpc.add_TrainerServicer_to_server(self.servicer, server)

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    async def start(self) -> None:
        config = self.config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(config.data_dir / "spool", ignore_errors=True)  # uploads a crash interrupted
        if not config.admin_token:
            log.warning("no --admin-token: the trainer cannot verify API keys, publish to the registry or "
                        "follow its tenant deletions")
        self.db = TrainerDatabase(config.effective_database_url)
        # Said before the first connection: a database that never answers keeps the trainer
        # NOT_SERVING with no error, and this line is then what names it.
        log.info("trainer opening database %s", self.db.engine.url.render_as_string(hide_password=True))
        try:
            await self._run(self.db.migrate)
        except Exception as exc:  # noqa: BLE001 - any driver error means the same to an operator
            raise Unavailable(f"cannot open or migrate the database {self.db.engine.url!r}: {exc}") from exc
        blobs = open_dataset_store(config)
        try:
            await self._run(blobs.start)
        except Exception as exc:  # noqa: BLE001
            raise Unavailable(f"cannot start the {config.blob_store} dataset store: {exc}") from exc
        store = TrainerStore(self.db)
        self.registry = RegistryClient(config.registry_address, config.admin_token, config.registry_timeout_seconds,
                                       config.max_message_mb, config.client_tls)
        auth = Authenticator(config.admin_token, self.registry, config.auth_cache_seconds, self.feed_state)
        models = BaseModels(self.registry)
        datasets = DatasetService(store, blobs, models, auth, self._run, config.data_dir / "spool",
                                  config.max_dataset_bytes)
        outage = OutageWait(config.outage_wait_seconds)
        env = RunnerEnv(jobs_dir=config.data_dir / "jobs", store=store, datasets=datasets, models=models,
                        publisher=Publisher(self.registry, outage), outage=outage, run=self._run, dtype=config.dtype,
                        torch_threads=config.torch_threads, keep_checkpoints=config.keep_checkpoints)
        hub = EventHub()
        self.queue = JobQueue(store, hub, lambda job, device, on_event: JobRunner(job, device, env, on_event),
                              config.devices, self._run, config.cancel_grace_seconds, config.max_interruptions,
                              lambda job_id: clear_job_folder(env.jobs_dir / job_id))
        await self._run(warm_up)  # the fork server imports the training stack while we are idle
        await self.queue.start()
        jobs = JobService(store, self.queue, hub, models, auth, self.registry, self._run, config.max_rank)
        self.servicer.attach(TrainerDomain(auth, datasets, jobs))
        purger = TenantPurger(store, self.queue, blobs, auth, self._run, env.jobs_dir)
        watcher = TenantDeletionWatcher(self.registry, store, purger, self._run, self.feed_state,
                                        key_revoked=auth.forget_key, reset=auth.clear)
        self.feed_task = asyncio.create_task(watcher.run_forever(), name="trainer-tenant-feed")
        self.sweep_task = asyncio.create_task(sweep_forever(store, blobs, self._run), name="trainer-orphan-sweep")
        log.info("trainer ready: database %s, %s dataset store, devices %s",
                 self.db.engine.url.render_as_string(hide_password=True), blobs.kind, ", ".join(config.devices))

    async def close(self) -> None:
        tasks = [task for task in (self.feed_task, self.sweep_task) if task is not None]
        for task in tasks:  # first: a purge must not race the queue's shutdown
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.queue is not None:
            await self.queue.close(self.config.grace_seconds)
        if self.registry is not None:
            await self.registry.close()
        if self.db is not None:
            self.db.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
