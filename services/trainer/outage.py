"""Waiting out an outage of what a job depends on, instead of failing the job at once.

A job reads its dataset from the blob store, asks the Registry for its base model, and at the end
uploads its adapter to the Registry. Either can restart or blip while a job runs; failing a job
that trained for an hour because the Registry was down for twenty seconds throws the hour
away (a failed job's folder is cleaned). So calls that fail with "unavailable" are retried with
capped exponential backoff for `--outage-wait-seconds`, and only then does the job fail.

A job cancelled or stopped while it waits must not sit out the rest of the wait: `interrupted`
ends the wait at once and the last error is raised, for the runner to turn into the outcome it
was asked for. `on_wait` is told what the job waits for while it waits (and "" once it is
over), so GetJob and WatchJob show why a running job is not moving (Job.waiting_for).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger("loraplex.trainer.outage")
T = TypeVar("T")
FIRST_BACKOFF_S, MAX_BACKOFF_S = 1.0, 30.0


@dataclasses.dataclass(frozen=True)
class OutageWait:
    """How long to retry an unavailable dependency (seconds; 0 fails on the first error)."""

    budget_s: float
    first_backoff_s: float = FIRST_BACKOFF_S
    max_backoff_s: float = MAX_BACKOFF_S

    @property
    def spent(self) -> str:
        """How a failure message says the wait ran out."""
        return f"past --outage-wait-seconds ({self.budget_s:g}s)"

    async def retrying(self, what: str, call: Callable[[], Awaitable[T]], retryable: tuple[type[BaseException], ...],
                       interrupted: asyncio.Event | None = None, on_wait: Callable[[str], None] | None = None) -> T:
        """`await call()`, retried while it raises one of `retryable` and the budget lasts.

        Raises the last error once the budget is spent or `interrupted` is set. Cancelling the
        awaiting task also ends the wait (the publisher is cancelled that way)."""
        loop = asyncio.get_running_loop()
        deadline, delay, attempt = loop.time() + self.budget_s, self.first_backoff_s, 1
        until = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=self.budget_s)
        waited = False
        try:
            while True:
                try:
                    return await call()
                except retryable as exc:
                    left = deadline - loop.time()
                    if left <= 0 or (interrupted is not None and interrupted.is_set()):
                        raise
                    pause = min(delay, left)
                    log.warning("%s failed (attempt %d), retrying in %.1fs for up to %.0fs more: %s",
                                what, attempt, pause, left, exc)
                    if on_wait is not None:
                        waited = True
                        on_wait(f"{what} failed {attempt} time(s); retrying until {until:%Y-%m-%dT%H:%M:%SZ} "
                                f"(--outage-wait-seconds), last error: {exc}")
                    if await _interrupted_within(interrupted, pause):
                        raise
                    delay, attempt = min(delay * 2, self.max_backoff_s), attempt + 1
        finally:
            if waited:
                on_wait("")


async def _interrupted_within(event: asyncio.Event | None, seconds: float) -> bool:
    """Sleeps `seconds`, or less if `event` is set meanwhile; True when it was set."""
    if event is None:
        await asyncio.sleep(seconds)
        return False
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True
