"""Publication of a trained adapter: upload to the Registry, then bind the deployment.

The upload goes through the Registry's ordinary UploadAdapter, so a trained adapter is
validated exactly like any other (safetensors only, shapes, NaN/Inf, rank). The trainer acts
with its admin token on behalf of the job's tenant. Uploading identical bytes again returns the
existing version (the Registry is idempotent), which makes a publication retried after a
restart safe. The deployment is pinned to the exact version just published (rebinding a name
the tenant already owns). UNAVAILABLE is retried a few times; other refusals fail the job.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from pathlib import Path

from services.common.errors import LoraplexError, Unavailable
from services.trainer.records import JobRecord
from services.trainer.registry_client import PublishedAdapter, RegistryClient

log = logging.getLogger("loraplex.trainer.publish")
ATTEMPTS, FIRST_BACKOFF_S = 4, 1.0


class PublishError(Exception):
    """Publication failed; `adapter` is set when the upload succeeded and the bind did not."""

    def __init__(self, message: str, adapter: PublishedAdapter | None = None) -> None:
        super().__init__(message)
        self.adapter = adapter


@dataclasses.dataclass
class Publisher:
    registry: RegistryClient

    async def _retrying(self, what: str, call):
        delay = FIRST_BACKOFF_S
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return await call()
            except Unavailable as exc:
                if attempt == ATTEMPTS:
                    raise
                log.warning("%s failed (attempt %d of %d), retrying in %.0fs: %s", what, attempt, ATTEMPTS, delay, exc)
                await asyncio.sleep(delay)
                delay *= 2

    async def publish(self, job: JobRecord, folder: Path) -> PublishedAdapter:
        labels = {"trainer-job": job.id, "trainer-dataset": job.dataset_id}
        try:
            adapter = await self._retrying("upload", lambda: self.registry.upload_adapter(
                job.tenant_id, job.output_adapter_name, job.base_model, folder,
                f"trained by loraplex trainer job {job.id}", labels))
        except LoraplexError as exc:
            raise PublishError(f"the registry refused the trained adapter: {exc.message}") from exc
        if job.deployment_name:
            try:
                await self._retrying("bind", lambda: self.registry.bind_deployment(
                    job.deployment_name, job.tenant_id, job.base_model, adapter.name, adapter.version))
            except LoraplexError as exc:
                raise PublishError(f"adapter published as '{adapter.name}' v{adapter.version}, but binding "
                                   f"deployment '{job.deployment_name}' failed: {exc.message}", adapter) from exc
        return adapter
