"""The Registry process: config -> database, blob store, domain context -> servicer.

Start-up (`start`, before the health service says SERVING): open the database and run
`alembic upgrade head`, start the blob store (create the bucket), sweep leftovers of a crash,
then attach the domain context to the servicer. A database or store that cannot be reached
ends the process with a message naming it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from concurrent.futures import ThreadPoolExecutor

import grpc

from services.common.errors import Unavailable
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.services import REGISTRY
from services.registry import gc
from services.registry.blobstore import open_blob_store
from services.registry.config import RegistryConfig
from services.registry.context import RegistryContext
from services.registry.db import Database
from services.registry.feed_notifier import FeedNotifier
from services.registry.servicer import RegistryServicer
from services.registry.validation import UploadLimits

log = logging.getLogger("loraplex.registry")
#: Blocking domain calls run here: DB queries, blob I/O, validation.
WORKER_THREADS = 16


def build_context(config: RegistryConfig) -> RegistryContext:
    """The domain context for `config`, with nothing started yet."""
    limits = UploadLimits(max_upload_bytes=config.max_upload_bytes, max_rank=config.max_rank,
                          max_archive_files=config.max_archive_files, max_zip_ratio=config.max_zip_ratio)
    return RegistryContext(db=Database(config.effective_database_url), store=open_blob_store(config), limits=limits,
                           admin_token=config.admin_token, spool_dir=config.data_dir / "spool",
                           notifier=FeedNotifier(),
                           change_retention=dt.timedelta(hours=config.change_retention_hours),
                           watch_poll_seconds=config.watch_poll_seconds,
                           stale_upload_age=dt.timedelta(hours=config.s3_stale_upload_hours))


def blob_location(config: RegistryConfig) -> str:
    if config.blob_store == "s3":
        return f"S3 endpoint {config.s3_endpoint} bucket {config.s3_bucket}"
    return f"folder {config.data_dir / 'blobs'}"


def start_context(ctx: RegistryContext, config: RegistryConfig) -> None:
    """Migrates the database, starts the store and sweeps crash leftovers (blocking)."""
    try:
        ctx.db.migrate()
    except Exception as exc:  # noqa: BLE001 - any driver error means the same to an operator
        raise Unavailable(f"cannot open or migrate the database {ctx.db.engine.url!r}: {exc}") from exc
    try:
        ctx.store.start()
    except Exception as exc:  # noqa: BLE001
        raise Unavailable(f"cannot start the {config.blob_store} blob store ({blob_location(config)}): {exc}") \
            from exc
    ctx.spool_dir.mkdir(parents=True, exist_ok=True)
    gc.sweep_at_start(ctx)


class RegistryApp:
    service_names = [REGISTRY.full_name]

    def __init__(self, config: RegistryConfig) -> None:
        self.config = config
        self.executor = ThreadPoolExecutor(max_workers=WORKER_THREADS, thread_name_prefix="registry")
        self.servicer = RegistryServicer(self.executor)
        self.ctx: RegistryContext | None = None

    def add_to_server(self, server: grpc.aio.Server) -> None:
        registry_pb2_grpc.add_RegistryServicer_to_server(self.servicer, server)

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.config.admin_token:
            log.warning("no --admin-token: admin RPCs (tenants, keys, base models, change feed) are refused")
        loop = asyncio.get_running_loop()
        ctx = await loop.run_in_executor(self.executor, build_context, self.config)
        ctx.notifier.bind(loop)
        ctx.db.on_feed_commit.append(ctx.notifier.notify)
        self.ctx = ctx
        # Said before the first connection: a database or store that never answers keeps the
        # registry NOT_SERVING with no error, and this line is then what names the culprit.
        log.info("registry opening database %s and the %s blob store %s",
                 ctx.db.engine.url.render_as_string(hide_password=True), self.config.blob_store,
                 blob_location(self.config))
        await loop.run_in_executor(self.executor, start_context, ctx, self.config)
        self.servicer.attach(ctx)
        log.info("registry ready: database %s, %s blob store", ctx.db.engine.url.render_as_string(hide_password=True),
                 ctx.store.kind)

    async def close(self) -> None:
        if self.ctx is not None:
            self.ctx.store.close()
            self.ctx.db.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
