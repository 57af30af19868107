"""Publication of a trained adapter: upload to the Registry, then bind the deployment.

The upload goes through the Registry's ordinary UploadAdapter, so a trained adapter is
validated exactly like any other (safetensors only, shapes, NaN/Inf, rank). The trainer acts
with its admin token on behalf of the job's tenant. Uploading identical bytes again returns the
existing version (the Registry is idempotent), which makes a publication retried after a
restart safe. The deployment is pinned to the exact version just published (rebinding a name
the tenant already owns). UNAVAILABLE is retried for --outage-wait-seconds (outage.py), so a
Registry restart does not throw a finished training run away; other refusals fail the job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from services.common.errors import LoraplexError, Unavailable
from services.trainer.outage import OutageWait
from services.trainer.records import JobRecord
from services.trainer.registry_client import PublishedAdapter, RegistryClient


class PublishError(Exception):
    """Publication failed; `adapter` is set when the upload succeeded and the bind did not."""

    def __init__(self, message: str, adapter: PublishedAdapter | None = None) -> None:
        super().__init__(message)
        self.adapter = adapter


@dataclasses.dataclass
class Publisher:
    registry: RegistryClient
    outage: OutageWait

    async def _retrying(self, what: str, call, on_wait: Callable[[str], None] | None):
        return await self.outage.retrying(what, call, (Unavailable,), on_wait=on_wait)

    def _refusal(self, exc: LoraplexError) -> str:
        if isinstance(exc, Unavailable):
            return f"the registry stayed unavailable {self.outage.spent}: {exc.message}"
        return f"the registry refused it: {exc.message}"

    async def publish(self, job: JobRecord, folder: Path,
                      on_wait: Callable[[str], None] | None = None) -> PublishedAdapter:
        """Uploads and binds; `on_wait` is told while a Registry outage is waited out (outage.py)."""
        labels = {"trainer-job": job.id, "trainer-dataset": job.dataset_id}
        try:
            adapter = await self._retrying(f"job {job.id}: uploading the adapter to the registry",
                                           lambda: self.registry.upload_adapter(
                                               job.tenant_id, job.output_adapter_name, job.base_model, folder,
                                               f"trained by loraplex trainer job {job.id}", labels), on_wait)
        except LoraplexError as exc:
            raise PublishError(f"the trained adapter was not published: {self._refusal(exc)}") from exc
        if job.deployment_name:
            try:
                await self._retrying(f"job {job.id}: binding its deployment in the registry",
                                     lambda: self.registry.bind_deployment(job.deployment_name, job.tenant_id,
                                                                           job.base_model, adapter.name,
                                                                           adapter.version), on_wait)
            except LoraplexError as exc:
                raise PublishError(f"adapter published as '{adapter.name}' v{adapter.version}, but binding deployment "
                                   f"'{job.deployment_name}' failed: {self._refusal(exc)}", adapter) from exc
        return adapter
