"""Garbage collection: blobs no adapter row references, stale incomplete uploads of adapter
blobs, and expired change-feed history.

An unreferenced blob comes from a crash between blob write and row commit, from deleted
adapter versions, or from deleted tenants (weights are shared between identical uploads, so
they are never deleted inline). A blob younger than `min_age_seconds` is kept: it may belong
to an upload that has not committed yet. Each deletion re-checks references under the blob
lock inside a write transaction, the same lock an upload holds while it re-checks the blob
and commits its row (see uploads.py), so an upload and the collector can never leave a row
without its blob. A blob store outage ends the run UNAVAILABLE, saying how many blobs were
removed before it; no row is ever changed, and the rest wait for the next run.

An S3 multipart upload cut off by a store outage (minio's own abort failing too) shows no
object but keeps its parts, holding storage, forever. The collector aborts such uploads of
`adapters/<sha256>` keys begun longer ago than --s3-stale-upload-hours: nothing else in the
bucket, which the Trainer shares (datasets/). Aborted uploads are logged; the response has no
field for them, and a dry run only counts them.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import shutil

from sqlalchemy import select

from services.common.errors import InvalidArgument
from services.registry import feed
from services.registry.auth import Principal, require_admin
from services.registry.blobstore.outage import store_down
from services.registry.context import ADAPTER_BLOB_PREFIX, RegistryContext
from services.registry.db.models import Adapter, utcnow

log = logging.getLogger("loraplex.registry.gc")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ADAPTER_BLOB_KEY = re.compile(rf"^{ADAPTER_BLOB_PREFIX}/[0-9a-f]{{64}}$")
#: Temp files of interrupted writes older than this are removed at start.
STALE_TEMP_SECONDS = 3600
#: The largest min_age_seconds accepted (ten years, like an API key's longest TTL). Far above
#: any sensible retention, and far below where the cutoff date would leave datetime's range
#: (year 1): a larger value is a typo or a unit mistake, refused rather than read as "keep all".
MAX_MIN_AGE_SECONDS = 10 * 365 * 24 * 3600


def collect_garbage(ctx: RegistryContext, principal: Principal, min_age_seconds: int,
                    dry_run: bool) -> tuple[list[str], int]:
    """Removes (or, dry run, lists) unreferenced blobs; returns (keys, bytes)."""
    require_admin(principal, "CollectGarbage")
    if min_age_seconds > MAX_MIN_AGE_SECONDS:
        raise InvalidArgument(f"min_age_seconds must be at most {MAX_MIN_AGE_SECONDS} (ten years), got "
                              f"{min_age_seconds}", reason="MIN_AGE_TOO_LARGE", field="min_age_seconds",
                              expected=f"<= {MAX_MIN_AGE_SECONDS}", actual=min_age_seconds)
    cutoff = utcnow() - dt.timedelta(seconds=min_age_seconds)
    with ctx.db.read() as session:
        referenced = set(session.scalars(select(Adapter.sha256).distinct()))
    removed, freed, aborted = [], 0, []
    with store_down(lambda: f"garbage collection removed {0 if dry_run else len(removed)} unreferenced blob(s) "
                            f"and aborted {0 if dry_run else len(aborted)} stale upload(s) before that; no adapter "
                            "row was changed"):
        candidates = [info for info in ctx.store.list(ADAPTER_BLOB_PREFIX)
                      if _SHA256.match(sha := info.key.rsplit("/", 1)[-1]) and sha not in referenced
                      and info.modified_at <= cutoff]
        for info in candidates:
            sha = info.key.rsplit("/", 1)[-1]
            if not dry_run:
                with ctx.db.write() as session:
                    ctx.db.lock(session, "blob", sha)
                    if session.scalar(select(Adapter.id).where(Adapter.sha256 == sha).limit(1)) is not None:
                        continue  # an upload claimed it since we listed
                    ctx.store.delete(info.key)
            removed.append(info.key)
            freed += info.size
        _abort_stale_uploads(ctx, dry_run, aborted)
    if not dry_run:
        pruned = feed.prune(ctx)
        log.info("garbage collection removed %d blobs (%d bytes) and %d feed events, and aborted %d stale "
                 "incomplete uploads", len(removed), freed, pruned, len(aborted))
    elif aborted:
        log.info("garbage collection (dry run) would abort %d stale incomplete uploads", len(aborted))
    return removed, freed


def _abort_stale_uploads(ctx: RegistryContext, dry_run: bool, aborted: list[str]) -> None:
    """Aborts (dry run: lists) incomplete uploads of adapter blobs older than the stale-upload age,
    appending their keys to `aborted` as it goes (an outage message counts them)."""
    cutoff = utcnow() - ctx.stale_upload_age
    # Listed in full first, like the blobs above, so no abort runs between the listing's pages.
    stale = [upload for upload in ctx.store.incomplete_uploads(ADAPTER_BLOB_PREFIX)
             if _ADAPTER_BLOB_KEY.match(upload.key) and upload.initiated_at <= cutoff]
    for upload in stale:
        if not dry_run:
            if not ctx.store.abort_upload(upload):
                continue
            log.info("aborted the incomplete upload %s of %s, begun %s", upload.upload_id, upload.key,
                     upload.initiated_at.isoformat())
        aborted.append(upload.key)


def sweep_at_start(ctx: RegistryContext) -> None:
    """Clears what a crashed process left: upload spools and stale store temp files.

    The spool folder belongs to this process alone (one registry process per --data-dir).
    """
    if ctx.spool_dir.is_dir():
        for leftover in ctx.spool_dir.iterdir():
            shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    sweep_temp = getattr(ctx.store, "sweep_temp", None)
    if sweep_temp is not None:
        sweep_temp(STALE_TEMP_SECONDS)
    feed.prune(ctx)
