"""Fan-out of job events to WatchJob streams (one process, in memory).

Every event carries a snapshot of the whole job, so a watcher that falls more than
MAX_PENDING events behind loses the oldest ones and still holds the truth; the terminal event
is the last one published for a job, so it is never the one dropped.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from services.trainer.records import JobRecord

MAX_PENDING = 256


class EventHub:
    def __init__(self) -> None:
        self._watchers: dict[str, set[asyncio.Queue]] = defaultdict(set)

    def subscribe(self, job_id: str) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(maxsize=MAX_PENDING)
        self._watchers[job_id].add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue) -> None:
        watchers = self._watchers.get(job_id)
        if watchers is not None:
            watchers.discard(queue)
            if not watchers:
                del self._watchers[job_id]

    def publish(self, kind: str, record: JobRecord) -> None:
        for queue in list(self._watchers.get(record.id, ())):
            if queue.full():
                queue.get_nowait()
            queue.put_nowait((kind, record.snapshot()))
