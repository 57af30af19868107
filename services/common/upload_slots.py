"""At most a few uploads of one tenant are received at a time; its others wait their turn.

An upload occupies the service's disk while it arrives and is checked (the Registry spools
an adapter's body and unpacks its weights, up to --max-upload-mb each; the Trainer spools a
dataset, up to --max-dataset-mb). Each upload is bounded, but their number was not: one
tenant key opening a hundred uploads at once could fill the disk every tenant shares (with
the embedded defaults, the same disk as the SQLite file and the blobs), failing everyone's
writes. Waiting instead of refusing keeps parallel uploads working, a few at a time: a
waiting upload has read and written nothing past its header, and the client's deadline
bounds its wait. Operators (the admin token: the Trainer publishing for a tenant, scripts)
are not counted; pass no tenant for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

#: Uploads of one tenant received at once; with 1 GiB uploads, at most ~8 GiB of scratch space.
PER_TENANT = 4


@dataclasses.dataclass
class _Slots:
    semaphore: asyncio.Semaphore
    users: int = 0  # holders and waiters: the entry goes when the last one leaves


class UploadSlots:
    """Per-tenant upload slots; use from one event loop."""

    def __init__(self, per_tenant: int = PER_TENANT) -> None:
        self.per_tenant = per_tenant
        self._tenants: dict[str, _Slots] = {}

    def users(self, tenant_id: str) -> int:
        """Uploads of the tenant holding or waiting for a slot."""
        slots = self._tenants.get(tenant_id)
        return slots.users if slots else 0

    @contextlib.asynccontextmanager
    async def hold(self, tenant_id: str) -> AsyncIterator[None]:
        """Waits for one of the tenant's slots and holds it for the block ("" : no limit)."""
        if not tenant_id:
            yield
            return
        slots = self._tenants.setdefault(tenant_id, _Slots(asyncio.Semaphore(self.per_tenant)))
        slots.users += 1
        try:
            async with slots.semaphore:
                yield
        finally:
            slots.users -= 1
            if not slots.users:
                del self._tenants[tenant_id]
