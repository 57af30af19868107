"""The Trainer gRPC servicer: protobuf in -> domain call -> protobuf out.

Every RPC authenticates first (auth.py); domain errors become statuses in
services/common/rpc.py. Statuses: UNAUTHENTICATED (no, bad or revoked token), NOT_FOUND
(unknown or another tenant's dataset/job/tenant, a deleted tenant's, unknown base model),
INVALID_ARGUMENT (bad header, dataset lines, hyperparameters, names, an empty id, a NUL
character in any request string; the message and ErrorInfo name the field), ALREADY_EXISTS
(deployment name taken or a base model's, a request_id reused for another job or dataset),
FAILED_PRECONDITION (cancel a finished job, delete a dataset in use, base model not local to
the trainer), UNAVAILABLE (still starting, or the Registry cannot be reached). Until the app
has started every RPC answers UNAVAILABLE.
"""

from __future__ import annotations

import dataclasses

from services.common.errors import InvalidArgument, Unavailable
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2_grpc
from services.registry import paging
from services.common.request_text import check_no_nul
from services.trainer import convert
from services.trainer.auth import Authenticator
from services.trainer.datasets import DatasetService
from services.trainer.db.models import utcnow
from services.trainer.jobs import JobService


@dataclasses.dataclass(frozen=True)
class TrainerDomain:
    auth: Authenticator
    datasets: DatasetService
    jobs: JobService


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self) -> None:
        self._domain: TrainerDomain | None = None

    def attach(self, domain: TrainerDomain) -> None:
        self._domain = domain

    @property
    def domain(self) -> TrainerDomain:
        if self._domain is None:
            raise Unavailable("the trainer is starting; retry shortly", reason="STARTING")
        return self._domain

    async def _principal(self, context, request=None):
        """The caller; then `request`'s text is checked for NUL characters, which PostgreSQL
        cannot hold (INTERNAL there, silently stored on SQLite): refused before the domain sees it."""
        metadata = {key.lower(): value for key, value in (context.invocation_metadata() or ())}
        principal = await self.domain.auth.principal(metadata.get("authorization"))
        if request is not None:
            check_no_nul(request)
        return principal

    # --- Datasets ---

    async def UploadDataset(self, request_iterator, context):
        principal = await self._principal(context)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("payload") != "header":
            raise InvalidArgument("the first UploadDataset message must be the header", reason="BAD_HEADER",
                                  field="header")
        check_no_nul(first.header, "header.")

        async def chunks():
            async for message in messages:
                if message.WhichOneof("payload") != "chunk":
                    raise InvalidArgument("only the first UploadDataset message may be a header",
                                          reason="BAD_HEADER", field="header")
                yield message.chunk

        record = await self.domain.datasets.upload(principal, convert.dataset_header(first.header), chunks())
        return convert.dataset(record)

    async def GetDataset(self, request, context):
        return convert.dataset(await self.domain.datasets.get(await self._principal(context, request), request.id))

    async def ListDatasets(self, request, context):
        principal = await self._principal(context, request)
        page = paging.page_request("trainer_datasets", request.page.page_size, request.page.page_token,
                                   caller=principal.tenant_id, tenant=request.tenant)  # a token continues this query only
        rows, token = await self.domain.datasets.list(principal, request.tenant, page)
        return pb.ListDatasetsResponse(datasets=[convert.dataset(r) for r in rows], next_page_token=token)

    async def DeleteDataset(self, request, context):
        await self.domain.datasets.delete(await self._principal(context, request), request.id)
        return pb.DeleteDatasetResponse()

    # --- Jobs ---

    async def StartJob(self, request, context):
        principal = await self._principal(context, request)
        return convert.job(await self.domain.jobs.start(principal, convert.job_request(request)))

    async def GetJob(self, request, context):
        return convert.job(await self.domain.jobs.get(await self._principal(context, request), request.id))

    async def ListJobs(self, request, context):
        principal = await self._principal(context, request)
        page = paging.page_request("trainer_jobs", request.page.page_size, request.page.page_token,
                                   caller=principal.tenant_id, tenant=request.tenant, states=sorted(request.states))
        rows, token = await self.domain.jobs.list(principal, request.tenant, convert.states(request.states), page)
        return pb.ListJobsResponse(jobs=[convert.job(r) for r in rows], next_page_token=token)

    async def CancelJob(self, request, context):
        return convert.job(await self.domain.jobs.cancel(await self._principal(context, request), request.id))

    async def WatchJob(self, request, context):
        principal = await self._principal(context, request)
        async for kind, record in self.domain.jobs.watch(principal, request.id):
            yield convert.job_event(kind, record, utcnow())
