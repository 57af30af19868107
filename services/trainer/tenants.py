"""Deleted tenants: everything the trainer holds for them goes, and nothing new can arrive.

The Registry deletes a tenant (its keys, adapters and deployments) and announces it on its
change feed; the trainer owns the tenant's datasets and jobs, so it removes them itself when
it learns of the deletion (feed.py). A purge, in this order, and why:
1. Tombstone the tenant (store.py): from that commit on no dataset or job can be created for
   it, so an upload or StartJob that was authenticated just before the deletion cannot leave
   anything behind the purge.
2. Forget its cached API keys and names: its callers are refused at once.
3. Cancel its queued and running jobs exactly as CancelJob does (a running worker is told to
   stop, killed after the grace period, and a publication not yet committed is abandoned): a
   deleted tenant's job must not spend the device, nor end FAILED when the Registry refuses its
   adapter. Watchers see the cancellation, with the reason, before the rows go. A job whose
   adapter the Registry had already committed refuses the cancel (publish.py) and runs on to
   its end (the Registry deleted that version with the tenant); its rows go all the same.
4. Delete the dataset and job rows, then the files: dataset blobs (by row and by the tenant's
   key prefix, which also catches blobs an interrupted upload left without a row) and job
   folders (checkpoints, outputs, logs).
Every step is idempotent, so a purge interrupted by a crash simply runs again: the feed cursor
only moves past a deletion once its purge has finished.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.common.errors import FailedPrecondition, NotFound
from services.registry.blobstore import BlobStore
from services.trainer.auth import Authenticator
from services.trainer.blobs import tenant_prefix
from services.trainer.queue import JobQueue
from services.trainer.store import TrainerStore

log = logging.getLogger("loraplex.trainer.tenants")
CANCEL_REASON = "cancelled: the tenant was deleted"


class TenantPurger:
    def __init__(self, store: TrainerStore, queue: JobQueue, blobs: BlobStore, auth: Authenticator,
                 run: Callable[..., Awaitable], jobs_dir: Path) -> None:
        self.store, self.queue, self.blobs, self.auth = store, queue, blobs, auth
        self.run, self.jobs_dir = run, jobs_dir

    async def purge(self, tenant_id: str) -> None:
        await self.run(self.store.mark_tenant_deleted, tenant_id)
        self.auth.forget_tenant(tenant_id)
        for job_id in await self.run(self.store.active_job_ids, tenant_id):
            try:
                await self.queue.cancel(job_id, CANCEL_REASON)
            except (FailedPrecondition, NotFound):
                pass  # it ended on its own meanwhile; its row goes below all the same
        blob_keys, job_ids = await self.run(self.store.delete_tenant_rows, tenant_id)
        removed = await self.run(self._remove_files, tenant_id, blob_keys, job_ids)
        log.info("tenant %s was deleted: removed %d dataset(s) (%d blob(s)) and %d job(s)", tenant_id,
                 len(blob_keys), removed, len(job_ids))

    def _remove_files(self, tenant_id: str, blob_keys: list[str], job_ids: list[str]) -> int:
        keys = set(blob_keys) | {blob.key for blob in self.blobs.list(tenant_prefix(tenant_id))}
        for key in keys:
            self.blobs.delete(key)
        for job_id in job_ids:
            shutil.rmtree(self.jobs_dir / job_id, ignore_errors=True)
        return len(keys)

    async def reconcile(self, exists: Callable[[str], Awaitable[bool]]) -> int:
        """Purges every local tenant the Registry no longer knows; returns how many.

        For when the feed cannot say what was deleted (no cursor yet, or it is no longer
        retained). Tenant ids are never reused, so an id the Registry does not know is a deleted
        tenant. Local ids are read before the Registry is asked, so a tenant created meanwhile
        is never mistaken for a deleted one.
        """
        local = sorted(await self.run(self.store.tenant_ids))
        gone = [tenant_id for tenant_id in local if not await exists(tenant_id)]
        if gone and len(gone) == len(local):
            # A Registry that knows none of our tenants is far likelier the wrong one (another
            # address, a reset database) than one where each was deleted: keep the data.
            log.error("the registry knows none of the %d tenant(s) this trainer holds data for; not purging "
                      "(is --registry-address right?)", len(local))
            return 0
        for tenant_id in gone:
            await self.purge(tenant_id)
        return len(gone)
