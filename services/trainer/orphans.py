"""Dataset blobs that no dataset row names, swept in the background.

DeleteDataset deletes the row first (so no job can start on a dataset half deleted) and the
bytes second; an upload writes its bytes first and its row second. A blob store outage or a
crash between the two leaves bytes that no row names: a tenant who deleted a dataset must not
keep it in storage for good, so the trainer sweeps such blobs at start and every hour.
A blob younger than `min_age` is left alone: an upload in flight has written its bytes but not
yet its row.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable

from services.registry.blobstore import BlobStore
from services.trainer.blobs import DATASET_PREFIX
from services.trainer.db.models import utcnow
from services.trainer.store import TrainerStore

log = logging.getLogger("loraplex.trainer.orphans")
MIN_AGE = dt.timedelta(hours=1)
SWEEP_EVERY_S = 3600.0


def sweep_orphan_datasets(store: TrainerStore, blobs: BlobStore, min_age: dt.timedelta = MIN_AGE) -> list[str]:
    """Deletes dataset blobs older than `min_age` that no row names; returns their keys."""
    named = store.dataset_blob_keys()  # before listing: a blob stored after this is young anyway
    now = utcnow()
    orphans = [blob.key for blob in blobs.list(DATASET_PREFIX)
               if blob.key not in named and now - blob.modified_at >= min_age]
    for key in orphans:
        blobs.delete(key)
    return orphans


async def sweep_forever(store: TrainerStore, blobs: BlobStore, run: Callable[..., Awaitable],
                        every_s: float = SWEEP_EVERY_S) -> None:
    while True:
        try:
            removed = await run(sweep_orphan_datasets, store, blobs)
            if removed:
                log.info("removed %d dataset blob(s) no dataset names: %s", len(removed), ", ".join(removed[:10]))
        except Exception:  # noqa: BLE001 - e.g. the store is down: try again at the next round
            log.warning("sweeping orphaned dataset blobs failed; retrying in %.0f s", every_s, exc_info=True)
        await asyncio.sleep(every_s)
