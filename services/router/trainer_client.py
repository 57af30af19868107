"""The Trainer as the router's OpenAI Files and Fine-tuning API uses it (datasets and jobs).

Every call presents the caller's own `authorization` header, not the router's admin token:
the Trainer verifies the key with the Registry and scopes the call to its tenant, so tenant
isolation is the Trainer's, as for any other of its callers, and the router cannot act for
the wrong tenant by mistake. Trainer statuses become domain errors with the Trainer's reason
and field (openai_trainer_terms.py words them for OpenAI callers); an unreachable Trainer, or
one that does not answer within --trainer-timeout-seconds, is UNAVAILABLE (a 503).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from services.common import errors, keepalive, tls
from services.common.pb.loraplex.trainer.v1 import trainer_pb2 as pb
from services.common.pb.loraplex.trainer.v1 import trainer_pb2_grpc
from services.common.rpc import STATUS_OF, error_info
from services.router.node_client import RECONNECT_OPTIONS
from services.router.openai_files import DatasetUpload, StoredFile
from services.router.openai_fine_tuning import JobSpec, TrainerJob

PAGE = 100
CHUNK = 1 << 20  # upload chunk: well under any message limit
ERROR_OF = {code: cls for cls, code in STATUS_OF.items()}
STATE_NAMES = {pb.JOB_STATE_QUEUED: "queued", pb.JOB_STATE_RUNNING: "running", pb.JOB_STATE_SUCCEEDED: "succeeded",
               pb.JOB_STATE_FAILED: "failed", pb.JOB_STATE_CANCELLED: "cancelled"}


def _seconds(stamp) -> float:
    return stamp.seconds + stamp.nanos / 1e9


def _optional_seconds(message, field: str) -> float | None:
    return _seconds(getattr(message, field)) if message.HasField(field) else None


def stored_file(dataset: pb.Dataset) -> StoredFile:
    return StoredFile(dataset.id, dataset.name, dataset.size_bytes, _seconds(dataset.created_at))


def trainer_job(job: pb.Job) -> TrainerJob:
    training, progress = job.training, job.progress
    return TrainerJob(
        id=job.id, tenant_id=job.tenant_id, state=STATE_NAMES.get(job.state, "queued"), base_model=job.base_model,
        dataset_id=job.dataset_id, deployment_name=job.deployment_name,
        epochs=training.epochs if training.HasField("epochs") else None,
        max_steps=training.max_steps if training.HasField("max_steps") else None,
        learning_rate=training.learning_rate, batch_size=training.batch_size, seed=training.seed,
        step=progress.step, total_steps=progress.total_steps,
        loss=progress.loss if progress.HasField("loss") else None,
        eta_seconds=progress.eta_seconds if progress.HasField("eta_seconds") else None,
        error=job.error, waiting_for=job.waiting_for, created_at=_seconds(job.created_at),
        started_at=_optional_seconds(job, "started_at"), finished_at=_optional_seconds(job, "finished_at"))


def start_job_request(spec: JobSpec) -> pb.StartJobRequest:
    training = pb.TrainingConfig(batch_size=spec.batch_size, seed=spec.seed)
    if spec.epochs is not None:
        training.epochs = spec.epochs
    if spec.learning_rate is not None:
        training.learning_rate = spec.learning_rate
    return pb.StartJobRequest(base_model=spec.base_model, dataset_id=spec.dataset_id, training=training,
                              output_adapter_name=spec.output_adapter_name, deployment_name=spec.deployment_name,
                              request_id=spec.request_id)


class TrainerClient:
    def __init__(self, address: str, timeout_s: float, max_message_mb: int = 64,
                 client_tls: tls.ClientTls | None = None) -> None:
        self.address, self.timeout_s = address, timeout_s
        limit = max_message_mb * 1024 * 1024
        self._channel = tls.aio_channel(address, client_tls, [("grpc.max_receive_message_length", limit),
                                                              *RECONNECT_OPTIONS, *keepalive.client_options()])
        self._stub = trainer_pb2_grpc.TrainerStub(self._channel)

    def _error(self, exc: grpc.aio.AioRpcError, what: str) -> errors.LoraplexError:
        code, info = exc.code(), error_info(exc)
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) or code not in ERROR_OF:
            return errors.Unavailable(f"the trainer at {self.address} could not {what}: {code.name} {exc.details()}",
                                      reason="TRAINER_UNAVAILABLE")
        metadata = {k: v for k, v in (info.metadata.items() if info else ()) if k not in ("reason", "message")}
        return ERROR_OF[code](exc.details() or code.name, reason=info.reason if info else None, **metadata)

    async def _call(self, rpc: str, request, authorization: str, what: str):
        try:
            return await getattr(self._stub, rpc)(request, metadata=(("authorization", authorization),),
                                                  timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, what) from None

    async def upload_dataset(self, authorization: str, upload: DatasetUpload) -> StoredFile:
        header = pb.UploadDatasetHeader(name=upload.filename, format=pb.DATASET_FORMAT_AUTO,
                                        base_model=upload.base_model, request_id=upload.request_id)

        async def messages():
            yield pb.UploadDatasetRequest(header=header)
            view = memoryview(upload.content)
            for start in range(0, len(view), CHUNK):
                yield pb.UploadDatasetRequest(chunk=bytes(view[start:start + CHUNK]))

        try:
            reply = await self._stub.UploadDataset(messages(), metadata=(("authorization", authorization),),
                                                   timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self._error(exc, "store the file") from None
        return stored_file(reply)

    async def get_dataset(self, authorization: str, dataset_id: str) -> StoredFile:
        return stored_file(await self._call("GetDataset", pb.GetDatasetRequest(id=dataset_id), authorization,
                                            "read a file"))

    def list_datasets(self, authorization: str) -> AsyncIterator[StoredFile]:
        return self._pages("ListDatasets", pb.ListDatasetsRequest, "datasets", stored_file, authorization, "list files")

    async def delete_dataset(self, authorization: str, dataset_id: str) -> None:
        await self._call("DeleteDataset", pb.DeleteDatasetRequest(id=dataset_id), authorization, "delete a file")

    async def start_job(self, authorization: str, spec: JobSpec) -> TrainerJob:
        return trainer_job(await self._call("StartJob", start_job_request(spec), authorization, "start a job"))

    async def get_job(self, authorization: str, job_id: str) -> TrainerJob:
        return trainer_job(await self._call("GetJob", pb.GetJobRequest(id=job_id), authorization, "read a job"))

    def list_jobs(self, authorization: str) -> AsyncIterator[TrainerJob]:
        return self._pages("ListJobs", pb.ListJobsRequest, "jobs", trainer_job, authorization, "list jobs")

    async def _pages(self, method: str, request_type, field: str, convert, authorization: str,
                     what: str) -> AsyncIterator:
        """Every item of a paged List RPC, a page at a time (the caller may stop early)."""
        token = ""
        while True:
            reply = await self._call(method, request_type(page={"page_size": PAGE, "page_token": token}),
                                     authorization, what)
            for item in getattr(reply, field):
                yield convert(item)
            token = reply.next_page_token
            if not token:
                return

    async def cancel_job(self, authorization: str, job_id: str) -> TrainerJob:
        return trainer_job(await self._call("CancelJob", pb.CancelJobRequest(id=job_id), authorization,
                                            "cancel a job"))

    async def close(self) -> None:
        await self._channel.close()
