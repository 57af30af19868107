"""The change feed: every change that caches care about, in one strictly ordered table.

Writers call `record` inside their transaction, as its last step (db/session.py explains
the feed lock that makes sequence order equal commit order). `watch` streams a position
marker, then history after the cursor, then live events: it wakes on local commits through
the notifier and polls for commits of other registry processes.

Cursor rules (after_sequence): -1 starts at the present; a value below the pruned history
or above the newest event is OUT_OF_RANGE (the client must drop its caches and restart from
-1). The position marker carries the sequence the stream continues from (the head for -1,
the cursor otherwise), so "resume after the last sequence received" is always safe, marker
included. History is pruned after --change-retention-hours, never the newest event, so the
head survives pruning.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from collections.abc import AsyncIterator, Sequence

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from services.common.errors import InvalidArgument, OutOfRange
from services.registry.auth import Principal, require_admin
from services.registry.context import RegistryContext
from services.registry.db.models import ChangeEvent, FeedState, utcnow

TENANT_DELETED = "TENANT_DELETED"
API_KEY_REVOKED = "API_KEY_REVOKED"
BASE_MODEL_REGISTERED = "BASE_MODEL_REGISTERED"
ADAPTER_CREATED = "ADAPTER_CREATED"
ADAPTER_DELETED = "ADAPTER_DELETED"
DEPLOYMENT_BOUND = "DEPLOYMENT_BOUND"
DEPLOYMENT_UNBOUND = "DEPLOYMENT_UNBOUND"
KINDS = (TENANT_DELETED, API_KEY_REVOKED, BASE_MODEL_REGISTERED, ADAPTER_CREATED, ADAPTER_DELETED,
         DEPLOYMENT_BOUND, DEPLOYMENT_UNBOUND)
BATCH = 500


@dataclasses.dataclass(frozen=True)
class FeedEvent:
    sequence: int
    kind: str = ""
    tenant_id: str = ""
    subject: str = ""
    created_at: dt.datetime | None = None
    is_position_marker: bool = False


def record(ctx: RegistryContext, session: Session, kind: str, tenant_id: str, subject: str) -> None:
    """Adds an event to the caller's transaction; call it after the transaction's other writes."""
    if not session.info.get("feed_locked"):
        ctx.db.lock(session, "feed")
        session.info["feed_locked"] = True
    session.add(ChangeEvent(kind=kind, tenant_id=tenant_id, subject=subject, created_at=utcnow()))
    session.info["feed_changed"] = True


def _position(session: Session) -> tuple[int, int]:
    head = session.scalar(select(func.max(ChangeEvent.sequence))) or 0
    state = session.get(FeedState, 1)
    return head, state.pruned_through if state else 0


def read_position(ctx: RegistryContext) -> tuple[int, int]:
    """(newest sequence, highest pruned sequence)."""
    with ctx.db.read() as session:
        return _position(session)


def read_events(ctx: RegistryContext, after: int, limit: int = BATCH) -> tuple[list[FeedEvent], int]:
    """Events with sequence > after, oldest first, and the highest pruned sequence."""
    with ctx.db.read() as session:
        rows = session.scalars(select(ChangeEvent).where(ChangeEvent.sequence > after)
                               .order_by(ChangeEvent.sequence).limit(limit))
        events = [FeedEvent(r.sequence, r.kind, r.tenant_id, r.subject, r.created_at) for r in rows]
        state = session.get(FeedState, 1)
    return events, state.pruned_through if state else 0


def prune(ctx: RegistryContext) -> int:
    """Deletes events older than the retention (keeping the newest); returns how many."""
    cutoff = utcnow() - ctx.change_retention
    with ctx.db.write() as session:
        head = session.scalar(select(func.max(ChangeEvent.sequence))) or 0
        last = session.scalar(select(func.max(ChangeEvent.sequence))
                              .where(ChangeEvent.created_at < cutoff, ChangeEvent.sequence < head))
        if not last:
            return 0
        removed = session.execute(delete(ChangeEvent).where(ChangeEvent.sequence <= last)).rowcount
        state = session.get(FeedState, 1)
        state.pruned_through = max(state.pruned_through, last)
    return removed


def _check_cursor(after: int, head: int, pruned: int) -> None:
    if after < pruned:
        raise OutOfRange(f"after_sequence {after} is older than the retained history (events up to {pruned} were "
                         "pruned); drop caches and restart with after_sequence = -1", reason="CURSOR_EXPIRED",
                         field="after_sequence", expected=f">= {pruned}", actual=after)
    if after > head:
        raise OutOfRange(f"after_sequence {after} is ahead of the feed (newest event is {head}); drop caches and "
                         "restart with after_sequence = -1", reason="CURSOR_AHEAD", field="after_sequence",
                         expected=f"<= {head}", actual=after)


async def watch(ctx: RegistryContext, principal: Principal, after_sequence: int, kinds: Sequence[str],
                run_blocking) -> AsyncIterator[FeedEvent]:
    """Marker, history, then live events until the caller stops iterating.

    `run_blocking(fn, *args)` runs a blocking call off the event loop and awaits it.
    """
    require_admin(principal, "WatchChanges")
    if after_sequence < -1:
        raise InvalidArgument(f"after_sequence must be >= -1, got {after_sequence}", field="after_sequence")
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise InvalidArgument(f"unknown change kinds {sorted(unknown)}", field="kinds")
    head, pruned = await run_blocking(read_position, ctx)
    cursor = head if after_sequence == -1 else after_sequence
    _check_cursor(cursor, head, pruned)
    yield FeedEvent(sequence=cursor, is_position_marker=True)
    wanted = set(kinds)
    while True:
        ticket = ctx.notifier.ticket()
        events, pruned = await run_blocking(read_events, ctx, cursor)
        if cursor < pruned:  # a consumer slower than the retention: it must restart
            _check_cursor(cursor, cursor, pruned)
        for event in events:
            cursor = event.sequence
            if not wanted or event.kind in wanted:
                yield event
        if len(events) < BATCH:
            await ctx.notifier.wait(ticket, ctx.watch_poll_seconds)
        else:
            await asyncio.sleep(0)
