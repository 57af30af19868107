"""The OpenAI-compatible HTTP API (Starlette), served by the router process next to gRPC.

    POST /v1/chat/completions   chat, streaming (SSE) or not
    POST /v1/completions        raw prompt, streaming (SSE) or not
    POST /v1/responses          OpenAI's Responses API on the chat path (not stored: GET /v1/responses/{id} is a 404)
    GET  /v1/models             the caller's deployments, then the base models (each name once)
    GET  /v1/models/{model}     one of those, or 404 (DELETE: the caller's deployment goes; base models 403)
    GET  /health                200 while the process runs (for load balancers)
    /v1/files, /v1/fine_tuning/jobs    uploads and fine-tuning jobs, through the Trainer
                                       (openai_fine_tuning_api.py)

Same path as gRPC: `Authorization: Bearer <tenant API key>`, RouterCore for resolution,
quotas, placement and failover. Errors are OpenAI-shaped
(`{"error": {"message", "type", "param", "code"}}`) with the matching HTTP status; a 429
carries Retry-After (and retry-after-ms, which the OpenAI SDK honours). A body larger than
the router's message limit (--max-message-mb, the same one gRPC callers have) is a 413, read
no further: past that size the node call would fail with gRPC's RESOURCE_EXHAUSTED, which
reads as "every node is busy" (a 429 the SDK retries).

Request ids: a caller may choose one, as gRPC callers set `request_id`, in an
X-Client-Request-Id header (OpenAI's name; the SDK passes it through `extra_headers`) or
X-Request-Id (what proxies add), the former winning when both are present; it is held to
services/common/fields.py's rules (a bad one is a 400 naming the header) and an empty one
counts as absent. Without one the router makes one. Generation answers, errors included,
carry it as x-request-id (the SDK's `request_id`); it is the id sent to the node and the one
the router logs. The response `id` is NOT derived from a client's id: a client may reuse its
id (the SDK's retries resend the same headers), and an `id` must name one response, so each
response gets a fresh one; only when the router chose the request id are the two the same
hex (`chatcmpl-<x-request-id>`).

Every error that can happen before the first token is a real status code, because
RouterCore.open returns only once the first token exists; a failure after it arrives as an
`error` event in the stream (the SDK raises it). A client that disconnects cancels the
request on its node.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common import errors
from services.common.fields import check_request_id
from services.router import openai_schema as schema
from services.router.choice_reader import ChoiceReader
from services.router.openai_choices import Streams, choice_calls, complete_all, open_all
from services.router.openai_responses import not_stored, responses_call
from services.router.openai_responses_output import response_object
from services.router.openai_responses_stream import ResponseFrames, response_events
from services.router.proxy import RouterCore

log = logging.getLogger("loraplex.router.http")

#: (error class, HTTP status, OpenAI error type), most specific first.
STATUS = [(errors.InvalidArgument, 400, "invalid_request_error"),
          (errors.Unauthenticated, 401, "authentication_error"),
          (errors.PermissionDenied, 403, "permission_error"),
          (errors.NotFound, 404, "invalid_request_error"),
          (errors.AlreadyExists, 409, "invalid_request_error"),
          (errors.FailedPrecondition, 400, "invalid_request_error"),
          (errors.OutOfRange, 400, "invalid_request_error"),
          (errors.ResourceExhausted, 429, "rate_limit_error"),
          (errors.Unavailable, 503, "server_error"),
          (errors.Unimplemented, 501, "invalid_request_error")]


#: Reasons whose HTTP status is more precise than their class's.
STATUS_OF_REASON = {"BODY_TOO_LARGE": 413}
#: Where a caller's own request id may come from, in order of precedence (see module docstring).
REQUEST_ID_HEADERS = ("x-client-request-id", "x-request-id")


def error_body(error: errors.LoraplexError) -> tuple[int, dict]:
    status, kind = next(((s, k) for cls, s, k in STATUS if isinstance(error, cls)), (500, "server_error"))
    status = STATUS_OF_REASON.get(error.reason, status)
    code = {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status, error.reason.lower())
    if isinstance(error, errors.NotFound) and error.metadata.get("field") == "model":
        code = "model_not_found"
    if "max_context" in error.metadata or "room" in error.metadata:  # the node's context checks
        code = "context_length_exceeded"
    return status, {"error": {"message": error.message, "type": kind, "param": error.metadata.get("field"),
                              "code": code}}


def error_response(error: errors.LoraplexError, request_id: str = "") -> JSONResponse:
    status, body = error_body(error)
    headers = {"x-request-id": request_id} if request_id else {}
    if isinstance(error, errors.ResourceExhausted):
        headers.update({"retry-after": str(max(1, math.ceil(error.retry_after_s))),
                        "retry-after-ms": str(int(error.retry_after_s * 1000))})
    return JSONResponse(body, status_code=status, headers=headers)


def _internal(exc: BaseException, request_id: str = "") -> errors.LoraplexError:
    error_id = uuid.uuid4().hex[:12]
    log.error("HTTP request %sfailed, error id %s", f"{request_id} " if request_id else "", error_id, exc_info=exc)
    error = errors.LoraplexError(f"internal error (error id {error_id}); the server log has the details",
                                 reason="INTERNAL")
    return error


def endpoint(handler: Callable[[Request], Awaitable[Response]]):
    async def wrapped(request: Request) -> Response:
        try:
            return await handler(request)
        except errors.LoraplexError as exc:
            return error_response(exc)
        except ClientGone:
            return Response(status_code=499)
        except Exception as exc:  # noqa: BLE001 - the HTTP boundary: a bug becomes a 500 with an error id
            return error_response(_internal(exc))

    return wrapped


class ClientGone(Exception):
    """The HTTP client disconnected before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable):
    """Awaits `work`, cancelling it (and so the node request) if the client disconnects first."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise ClientGone()
    return task.result()


async def read_body(request: Request, limit: int, limit_flag: str = "--max-message-mb") -> bytes:
    """The whole body; a 413 (BODY_TOO_LARGE) as soon as it is known to exceed `limit` bytes."""
    too_large = errors.InvalidArgument(f"the request body is larger than this router's limit of "
                                       f"{limit // 2**20} MiB ({limit_flag})", reason="BODY_TOO_LARGE", field="body")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async for chunk in request.stream():  # counted as it arrives: a chunked body declares no length
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:  # the client's doing, not an internal error
        raise ClientGone() from None
    return b"".join(chunks)


async def json_body(request: Request, limit: int) -> dict:
    raw = await read_body(request, limit)
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise errors.InvalidArgument("the request body is not valid JSON", field="body") from None
    if not isinstance(body, dict):
        raise errors.InvalidArgument("the request body must be a JSON object", field="body")
    where = unencodable(body)
    if where is not None:
        raise errors.InvalidArgument(f"'{where}': a JSON string holds an unpaired UTF-16 surrogate (an escape like "
                                     "\\ud800 without its pair), which is not Unicode text", field=where)
    return body


def unencodable(body: dict) -> str | None:
    """Where the body holds a string UTF-8 cannot encode, or None. JSON lets an escape name half a
    surrogate pair and json.loads keeps it, but protobuf (the node call, the Registry lookup) and
    our own JSON answers encode UTF-8 and would fail on it: a 500 for the caller's bad input. A
    walk with its own stack, as a body nested as deep as the parser allows must not overflow ours."""
    pending: list[tuple[str, object]] = [("", body)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            if not _encodes(value):
                return path or "body"
        elif isinstance(value, dict):
            for key, item in value.items():
                if not _encodes(key):  # the key cannot name itself in an answer either
                    return path or "body"
                pending.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            pending.extend((f"{path}[{i}]", item) for i, item in enumerate(value))
    return None


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def client_request_id(request: Request) -> str:
    """The caller's request id, or "" when it sent none."""
    for header in REQUEST_ID_HEADERS:
        value = request.headers.get(header, "")
        if value:
            return check_request_id(value, field=header)
    return ""


def in_callers_terms(error: errors.LoraplexError, renames: dict[str, str]) -> errors.LoraplexError:
    """The error with `param` (and a message that opens with the node's name for it) naming the
    request's field: chat's `messages` for the node's prompt, `max_completion_tokens` when that
    is what the caller set, never a parameter the caller did not send."""
    field = error.metadata.get("field", "")
    if renames.get(field, field) != field:
        error.metadata["field"] = renames[field]
        if field != "prompt" and error.message.startswith(f"{field} "):  # "prompt of N tokens" reads right as is
            error.message = renames[field] + error.message[len(field):]
    return error


class DataFrames:
    """Chat's and completions' SSE framing: each event a `data:` line, `data: [DONE]` after the
    last, a failure as its OpenAI error body. Another API may frame its events otherwise, with
    these three methods (openai_responses_stream.ResponseFrames)."""

    def event(self, payload: dict) -> str:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def end(self) -> str:
        return "data: [DONE]\n\n"

    def error(self, body: dict) -> str:
        return self.event(body)


class SSEResponse(StreamingResponse):
    """A stream of events, framed by `frames`, that always closes its source, however the
    response ends."""

    def __init__(self, events: AsyncIterator[dict], stream: Streams, frames: DataFrames | None = None) -> None:
        super().__init__(self._encode(events, stream, frames or DataFrames()), media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-request-id": stream.request_id})

    @staticmethod
    async def _encode(events: AsyncIterator[dict], stream: Streams, frames: DataFrames) -> AsyncIterator[str]:
        try:
            async for payload in events:
                yield frames.event(payload)
            end = frames.end()
            if end:  # an empty chunk would be sent as one
                yield end
        except errors.LoraplexError as exc:
            yield frames.error(error_body(exc)[1])
        except Exception as exc:  # noqa: BLE001 - headers are sent: report it in-band
            yield frames.error(error_body(_internal(exc))[1])
        finally:
            await stream.aclose()

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def chat_events(streams: Streams, response_id: str, created: int,
                      options: schema.Options) -> AsyncIterator[dict]:
    """Each choice's deltas as choice_reader.ChoiceReader gives them: its thinking as
    reasoning_content, then its answer as it comes (with tools, calls once read whole, text that
    may be call markup held back); logprobs still come as they go, its finish_reason on its last
    chunk."""
    chunk = functools.partial(schema.chat_chunk, response_id, created, streams.target.model,
                              include_usage=options.include_usage)
    tools = options.tool_use
    readers = {}  # each choice's ChoiceReader, made on its first delta (which says how its model writes)
    for index in range(len(streams.streams)):
        yield chunk({"role": "assistant", "content": None if tools else ""}, index=index)
    async for index, delta in streams.deltas():
        finish = schema.FINISH.get(delta.finish_reason)
        logprobs = schema.chat_logprobs(delta.logprobs) if options.logprobs and delta.logprobs else None
        if index not in readers:
            readers[index] = ChoiceReader(tools, delta.tool_call_format, delta.reasoning_start, options.constrained)
        parts = readers[index].feed(delta.text)
        if finish:
            last, finish = readers[index].finish(finish)
            parts += last
        if not parts and (finish or logprobs):
            parts = [{}]
        for k, part in enumerate(parts):  # logprobs on the first, the finish on the last
            yield chunk(part, finish if k == len(parts) - 1 else None, logprobs if k == 0 else None, index=index)
    if options.include_usage:  # after every choice has finished: the usage of them all
        yield chunk({}, usage_=schema.usage(streams.usage()), with_choice=False)


async def completion_events(streams: Streams, response_id: str, created: int,
                            options: schema.Options) -> AsyncIterator[dict]:
    offsets = [schema.TextOffsets() for _ in streams.streams]  # each choice's text counts from 0
    chunk = functools.partial(schema.completion_chunk, response_id, created, streams.target.model,
                              include_usage=options.include_usage)
    async for index, delta in streams.deltas():
        finish = schema.FINISH.get(delta.finish_reason)
        logprobs = (schema.completion_logprobs(delta.logprobs, offsets[index])
                    if options.logprobs and delta.logprobs else None)
        if delta.text or finish or logprobs:
            yield chunk(delta.text, finish, logprobs, index=index)
    if options.include_usage:
        yield chunk("", usage_=schema.usage(streams.usage()), with_choice=False)


def build_app(core: RouterCore, max_body_bytes: int = 64 * 2**20, more_routes: Sequence[Route] = ()) -> Starlette:
    """The API; `more_routes` adds the Files and Fine-tuning API (openai_fine_tuning_api.py)."""
    async def generate(request: Request, parse, respond, events, prompt_param: str, frames=DataFrames) -> Response:
        # before anything can fail, so every answer can name it
        response_id = request_id = uuid.uuid4().hex
        # the node's names for what this API calls otherwise, for the errors it raises
        renames = {"prompt": prompt_param, "structured_output": "response_format"}
        try:
            request_id = client_request_id(request) or request_id
            caller = await core.authenticate(request.headers.get("authorization"))
            call, options = parse(await json_body(request, max_body_bytes))
            renames["max_tokens"] = options.max_tokens_param
            renames["structured_output"] = options.structured_output_param
            calls = choice_calls(dataclasses.replace(call, request_id=request_id), options.n)
            created = int(time.time())
            if not options.stream:
                done = await unless_disconnected(request, complete_all(core, caller, calls))
                return JSONResponse(respond(done, response_id, created, options),
                                    headers={"x-request-id": done[0].request_id})
            stream = await unless_disconnected(request, open_all(core, caller, calls))
        except errors.LoraplexError as exc:
            return error_response(in_callers_terms(exc, renames), request_id)
        except ClientGone:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug: still a 500 that names the request, as the log does
            return error_response(_internal(exc, request_id), request_id)
        return SSEResponse(events(stream, response_id, created, options), stream, frames())

    @endpoint
    async def chat_completions(request: Request) -> Response:
        return await generate(request, schema.chat_call, schema.chat_completion, chat_events, "messages")

    @endpoint
    async def completions(request: Request) -> Response:
        return await generate(request, schema.completion_call, schema.text_completion, completion_events, "prompt")

    @endpoint
    async def responses(request: Request) -> Response:
        return await generate(request, responses_call, response_object, response_events, "input", ResponseFrames)

    @endpoint
    async def stored_response(request: Request) -> Response:
        await core.authenticate(request.headers.get("authorization"))  # a 401 first, as for any other route
        raise not_stored(request.path_params["response_id"])

    @endpoint
    async def list_models(request: Request) -> Response:
        caller = await core.authenticate(request.headers.get("authorization"))
        models = await core.list_models(caller)
        return JSONResponse({"object": "list", "data": [schema.model_object(m, caller.tenant_name) for m in models]})

    @endpoint
    async def get_model(request: Request) -> Response:
        caller = await core.authenticate(request.headers.get("authorization"))
        name = request.path_params["model"]
        if request.method == "DELETE":  # the SDK's models.delete, for a fine-tuned model: its deployment
            await core.resolver.delete(caller, name)
            return JSONResponse({"id": name, "object": "model", "deleted": True})
        target = await core.resolve(caller, name)  # NOT_FOUND for other tenants' names too
        entry = next((m for m in await core.list_models(caller) if m.name == target.model), None)
        if entry is None:
            raise errors.NotFound(f"model '{name}' not found", field="model")
        return JSONResponse(schema.model_object(entry, caller.tenant_name))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: HTTPException) -> Response:
        where = f"{request.method} {request.url.path}"
        error = errors.NotFound(f"no route {where}", reason="NO_ROUTE") if exc.status_code == 404 else \
            errors.InvalidArgument(f"{where}: {exc.detail}",
                                   reason="METHOD_NOT_ALLOWED" if exc.status_code == 405 else "BAD_REQUEST")
        status, body = error_body(error)
        # exc.headers: a 405's Allow, which HTTP requires and which tells a caller the right method
        return JSONResponse(body, status_code=exc.status_code if exc.status_code != 404 else status,
                            headers=exc.headers)

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/responses", responses, methods=["POST"]),
        Route("/v1/responses/{response_id:path}", stored_response, methods=["GET", "DELETE"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", get_model, methods=["GET", "DELETE"]),
        Route("/health", health, methods=["GET"]),
        *more_routes,
    ], exception_handlers={HTTPException: http_error})
