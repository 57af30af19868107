"""Publication of a trained adapter: upload to the Registry, then bind the deployment.

The upload goes through the Registry's ordinary UploadAdapter, so a trained adapter is
validated exactly like any other (safetensors only, shapes, NaN/Inf, rank). The trainer acts
with its admin token on behalf of the job's tenant. Uploading identical bytes again returns the
existing version (the Registry is idempotent), which makes a publication retried after a
restart safe. The deployment is pinned to the exact version just published (rebinding a name
the tenant already owns). UNAVAILABLE is retried for --outage-wait-seconds (outage.py), so a
Registry restart does not throw a finished training run away; other refusals fail the job.

Cancel versus publication (decision): the Registry committing the adapter version is the point
of no return. Before it a cancel wins and nothing is published afterwards, even when the cancel
lands while an outage is waited out; after it the cancel is refused (FAILED_PRECONDITION,
"already published as <adapter> vN") and the job goes on to bind its deployment and succeed.
So a CANCELLED job leaves no adapter version or binding behind, and a SUCCEEDED job always has
its version (and its binding, when it asked for one). Letting the cancel win and deleting the
version was rejected: the delete is one more Registry call that can fail or wait out an
outage, and meanwhile the version exists (and may be served). `PublicationGate` makes the
choice atomic: an upload never starts once a cancel was accepted, and a cancel is never
accepted while an upload is out (it waits for the Registry's answer). The commit is recorded
on the job's row (adapter_id), so a job a shutdown puts back in the queue after its commit
refuses a cancel too (queue.py). Left open: an upload whose answer was lost after the Registry
committed it (the connection dropped; it reads as UNAVAILABLE) followed by a cancel during the
outage wait, and a crash between the commit and its record in the trainer's database.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
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


class PublicationCancelled(Exception):
    """The job was cancelled before its adapter was uploaded: nothing was published."""


class PublicationGate:
    """Decides cancel versus publication for one job (see the module docstring).

    Everything runs on the event loop, so each check and the state change it guards happen with
    no await between them: that is what makes "check, then commit" and "check, then accept the
    cancel" atomic with respect to each other.
    """

    def __init__(self, published: PublishedAdapter | None,
                 on_commit: Callable[[PublishedAdapter], Awaitable[None]]) -> None:
        #: The committed version; set from the job's record when an earlier run of it committed.
        self.published = published
        self.closed = False  # a cancel was accepted: no upload may start
        self.on_commit = on_commit  # records the commit (the job's database row) before anyone sees it
        self._uploading: asyncio.Event | None = None  # set when the upload in flight has its answer

    async def commit(self, upload: Callable[[], Awaitable[PublishedAdapter]]) -> PublishedAdapter:
        """One upload attempt, unless a cancel came first (PublicationCancelled)."""
        if self.closed:
            raise PublicationCancelled()
        answered = self._uploading = asyncio.Event()
        try:
            adapter = await upload()
            self.published = adapter
            await self.on_commit(adapter)
            return adapter
        finally:
            self._uploading = None
            answered.set()

    async def answered(self) -> None:
        """Returns once no upload is in flight (its commit, if any, recorded)."""
        while self._uploading is not None:
            await self._uploading.wait()

    async def close(self) -> PublishedAdapter | None:
        """For a cancel: None when it wins (no upload starts from now on), else the version
        already committed (the cancel loses)."""
        await self.answered()
        if self.published is None:
            self.closed = True
        return self.published


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

    async def publish(self, job: JobRecord, folder: Path, gate: PublicationGate,
                      on_wait: Callable[[str], None] | None = None) -> PublishedAdapter:
        """Uploads (each attempt through `gate`) and binds; `on_wait` is told while a Registry
        outage is waited out (outage.py). PublicationCancelled when a cancel closed the gate."""
        labels = {"trainer-job": job.id, "trainer-dataset": job.dataset_id}
        try:
            adapter = await self._retrying(f"job {job.id}: uploading the adapter to the registry",
                                           lambda: gate.commit(lambda: self.registry.upload_adapter(
                                               job.tenant_id, job.output_adapter_name, job.base_model, folder,
                                               f"trained by loraplex trainer job {job.id}", labels)), on_wait)
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
