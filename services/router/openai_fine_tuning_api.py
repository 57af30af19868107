"""HTTP routes of OpenAI's Files and Fine-tuning API: request in -> domain call -> JSON out.

What each route does is in openai_files.py and openai_fine_tuning.py; this layer only reads
the request (authentication first, like every route: a bad key is a 401 before anything
else), its query and body, and answers with OpenAI-shaped JSON and errors (http_api.py).
Uploads are bounded by --max-upload-mb (413 past it, read no further), JSON bodies by
--max-message-mb. A router started without --trainer-address answers every route with a 501
saying so, after authenticating the caller.
"""

from __future__ import annotations

import dataclasses

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common import errors
from services.router.auth import Caller
from services.router.http_api import endpoint, json_body, read_body
from services.router.openai_files import FilesApi
from services.router.openai_fine_tuning import FineTuningApi
from services.router.proxy import RouterCore

#: The header whose value makes a create safe to retry (openai_trainer_terms.trainer_request_id).
IDEMPOTENCY_HEADER = "idempotency-key"


@dataclasses.dataclass(frozen=True)
class FineTuningBackend:
    """What the routes call; None in `routes` when the router has no Trainer."""

    files: FilesApi
    jobs: FineTuningApi
    max_upload_bytes: int
    max_body_bytes: int


def not_configured() -> errors.Unimplemented:
    return errors.Unimplemented("fine-tuning is not configured on this router: it was started without "
                                "--trainer-address, so /v1/files and /v1/fine_tuning are off",
                                reason="FINE_TUNING_NOT_CONFIGURED")


def _query_int(request: Request, name: str, default: int, high: int) -> int:
    text = request.query_params.get(name)
    if text is None:
        return default
    if not text.isdigit() or not 1 <= int(text) <= high:
        raise errors.InvalidArgument(f"{name} must be an integer from 1 to {high}, got {text[:40]!r}", field=name)
    return int(text)


def _order_is_ascending(request: Request) -> bool:
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise errors.InvalidArgument(f"order must be 'asc' or 'desc', got {order[:40]!r}", field="order")
    return order == "asc"


def routes(core: RouterCore, backend: FineTuningBackend | None) -> list[Route]:
    async def caller_of(request: Request) -> tuple[Caller, str, FineTuningBackend]:
        authorization = request.headers.get("authorization", "")
        caller = await core.authenticate(authorization)
        if backend is None:
            raise not_configured()
        return caller, authorization, backend

    @endpoint
    async def create_file(request: Request) -> Response:
        caller, authorization, api = await caller_of(request)
        body = await read_body(request, api.max_upload_bytes, "--max-upload-mb")
        created = await api.files.create(caller, authorization, request.headers.get("content-type", ""), body,
                                         request.headers.get(IDEMPOTENCY_HEADER, ""))
        return JSONResponse(created)

    @endpoint
    async def list_files(request: Request) -> Response:
        _, authorization, api = await caller_of(request)
        purpose = request.query_params.get("purpose", "")
        if purpose and purpose != "fine-tune":  # the only purpose stored here: no such files
            return JSONResponse({"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None})
        return JSONResponse(await api.files.list(authorization, _query_int(request, "limit", 10_000, 10_000),
                                                 request.query_params.get("after", ""), _order_is_ascending(request)))

    @endpoint
    async def retrieve_file(request: Request) -> Response:
        _, authorization, api = await caller_of(request)
        return JSONResponse(await api.files.retrieve(authorization, request.path_params["file_id"]))

    @endpoint
    async def delete_file(request: Request) -> Response:
        _, authorization, api = await caller_of(request)
        return JSONResponse(await api.files.delete(authorization, request.path_params["file_id"]))

    @endpoint
    async def file_content(request: Request) -> Response:
        _, authorization, api = await caller_of(request)
        content = await api.files.content(authorization, request.path_params["file_id"])
        return Response(content, media_type="application/octet-stream")

    @endpoint
    async def create_job(request: Request) -> Response:
        caller, authorization, api = await caller_of(request)
        body = await json_body(request, api.max_body_bytes)
        created = await api.jobs.create(caller, authorization, body, request.headers.get(IDEMPOTENCY_HEADER, ""))
        return JSONResponse(created)

    @endpoint
    async def list_jobs(request: Request) -> Response:
        _, authorization, api = await caller_of(request)
        return JSONResponse(await api.jobs.list(authorization, _query_int(request, "limit", 20, 100),
                                                request.query_params.get("after", "")))

    @endpoint
    async def retrieve_job(request: Request) -> Response:
        _, authorization, api = await caller_of(request)
        return JSONResponse(await api.jobs.retrieve(authorization, request.path_params["job_id"]))

    @endpoint
    async def cancel_job(request: Request) -> Response:
        _, authorization, api = await caller_of(request)
        return JSONResponse(await api.jobs.cancel(authorization, request.path_params["job_id"]))

    @endpoint
    async def job_events(request: Request) -> Response:
        _, authorization, api = await caller_of(request)
        return JSONResponse(await api.jobs.events(authorization, request.path_params["job_id"],
                                                  _query_int(request, "limit", 20, 100),
                                                  request.query_params.get("after", "")))

    return [
        Route("/v1/files", create_file, methods=["POST"]),
        Route("/v1/files", list_files, methods=["GET"]),
        Route("/v1/files/{file_id}", retrieve_file, methods=["GET"]),
        Route("/v1/files/{file_id}", delete_file, methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", file_content, methods=["GET"]),
        Route("/v1/fine_tuning/jobs", create_job, methods=["POST"]),
        Route("/v1/fine_tuning/jobs", list_jobs, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}", retrieve_job, methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/events", job_events, methods=["GET"]),
    ]
