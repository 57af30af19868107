"""The one place where domain errors become gRPC statuses, plus request logging and metrics.

`ServerInterceptor` wraps every handler kind (unary and streaming, both directions):
- a `LoraplexError` ends the call with its status code, its message, and a
  google.rpc.ErrorInfo detail (RetryInfo too for RESOURCE_EXHAUSTED);
- anything unexpected ends it with INTERNAL and an error id; the traceback goes to the log
  under that id, never to the client;
- each call is logged (method, status, duration) and counted in Prometheus.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import errors
from services.common.metrics import RPC_ERRORS, RPC_IN_FLIGHT, RPC_LATENCY, RPC_REQUESTS

log = logging.getLogger("loraplex.rpc")

ERROR_DOMAIN = "loraplex"

STATUS_OF: dict[type[errors.LoraplexError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def status_code_of(error: errors.LoraplexError) -> grpc.StatusCode:
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.UNKNOWN


#: Bounds on what an error carries. Statuses travel in trailers, whose size gRPC caps (8 KiB by
#: default, a soft limit: past it a client drops trailers with a probability that grows to 1 at
#: the hard limit): an error echoing a 1 MB id would otherwise reach the client as "Stream
#: removed (metadata size exceeds ... limit)", with no code it can act on. The message is sent
#: twice: as grpc-message, percent-encoded (3 bytes for each UTF-8 byte outside printable ASCII,
#: so it is bounded by that size), and inside grpc-status-details-bin (base64, with the
#: ErrorInfo's metadata, bounded in UTF-8 bytes: at most 16 entries, 1.5 KiB in all). Together
#: at most about 7 KiB (test_rpc.py checks the worst case), under the soft limit.
MAX_MESSAGE_BYTES, MAX_METADATA_VALUE_BYTES, MAX_METADATA_ENTRIES, MAX_METADATA_BYTES = 2048, 128, 16, 1536


def bounded(text: str, limit: int) -> str:
    """`text` cut to `limit` UTF-8 bytes at a character boundary, saying how much was left out."""
    data = text.encode()
    if len(data) <= limit:
        return text
    kept = data[:limit - 40].decode(errors="ignore")
    return f"{kept}… ({len(text) - len(kept)} more characters)"


def percent_encoded_size(text: str) -> int:
    """The bytes `text` takes as a grpc-message header (gRPC's percent-encoding)."""
    return sum(1 if 0x20 <= byte <= 0x7E and byte != 0x25 else 3 for byte in text.encode())


def bounded_message(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    """`text` cut so that it takes at most `limit` bytes as a grpc-message header."""
    if percent_encoded_size(text) <= limit:
        return text
    budget, size, kept = limit - 120, 0, 0  # room for the note, itself percent-encoded
    for kept, character in enumerate(text):
        size += percent_encoded_size(character)
        if size > budget:
            break
    return f"{text[:kept]}… ({len(text) - kept} more characters)"


def _bounded_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """At most MAX_METADATA_ENTRIES entries and MAX_METADATA_BYTES in all, in their order."""
    bounded_entries, left = {}, MAX_METADATA_BYTES
    for key, value in list(metadata.items())[:MAX_METADATA_ENTRIES]:
        key, value = bounded(key, 64), bounded(value, min(MAX_METADATA_VALUE_BYTES, max(left - 64, 48)))
        left -= len(key.encode()) + len(value.encode())
        if left < 0:
            break
        bounded_entries[key] = value
    return bounded_entries


def to_rpc_status(error: errors.LoraplexError) -> grpc.Status:
    """The status (code, message, details) a domain error is sent as, its text bounded."""
    code = status_code_of(error)
    details = [error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN,
                                           metadata=_bounded_metadata(error.metadata))]
    if isinstance(error, errors.ResourceExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(error.retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        holder = any_pb2.Any()
        holder.Pack(detail)
        packed.append(holder)
    status = status_pb2.Status(code=getattr(code_pb2, code.name), message=bounded_message(error.message),
                               details=packed)
    return rpc_status.to_status(status)


def error_info(rpc_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """Client side: the ErrorInfo detail of a failed call, if the server attached one."""
    status = rpc_status.from_call(rpc_error)
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


class _CallOutcome:
    """Tracks one call for logging and metrics."""

    def __init__(self, service: str, method: str) -> None:
        self.service, self.method = service, method
        self.code = grpc.StatusCode.OK
        self.started = time.perf_counter()
        RPC_IN_FLIGHT.labels(service, method).inc()

    def finish(self, context: grpc.aio.ServicerContext) -> None:
        if self.code == grpc.StatusCode.OK:
            self.code = _context_code(context)
        elapsed = time.perf_counter() - self.started
        RPC_IN_FLIGHT.labels(self.service, self.method).dec()
        RPC_REQUESTS.labels(self.service, self.method, self.code.name).inc()
        RPC_LATENCY.labels(self.service, self.method).observe(elapsed)
        if self.code != grpc.StatusCode.OK:
            RPC_ERRORS.labels(self.service, self.method, self.code.name).inc()
        log.info("rpc %s/%s %s %.1fms", self.service, self.method, self.code.name, elapsed * 1000)


def _context_code(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    code = context.code()
    if code is None:
        return grpc.StatusCode.OK
    if isinstance(code, grpc.StatusCode):
        return code
    for candidate in grpc.StatusCode:  # the aio context may report the raw integer
        if candidate.value[0] == code:
            return candidate
    return grpc.StatusCode.UNKNOWN


async def _abort_for(exc: BaseException, outcome: _CallOutcome, context: grpc.aio.ServicerContext) -> None:
    """Ends the call with the status `exc` stands for (always raises)."""
    if isinstance(exc, errors.LoraplexError):
        outcome.code = status_code_of(exc)
        status = to_rpc_status(exc)
        await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)
    error_id = uuid.uuid4().hex[:12]
    log.error("rpc %s/%s failed, error id %s", outcome.service, outcome.method, error_id, exc_info=exc)
    outcome.code = grpc.StatusCode.INTERNAL
    await context.abort(
        grpc.StatusCode.INTERNAL, f"internal error (error id {error_id}); the server log has the details"
    )


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], service: str, method: str):
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        outcome = _CallOutcome(service, method)
        try:
            return await behavior(request_or_iterator, context)
        except grpc.aio.AbortError:
            outcome.code = _context_code(context)
            raise
        except asyncio.CancelledError:  # the client went away or the server is stopping
            outcome.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001 - this is the boundary that maps them all
            await _abort_for(exc, outcome, context)
        finally:
            outcome.finish(context)

    return handler


def _wrap_stream(behavior: Callable[..., AsyncIterator[Any]], service: str, method: str):
    async def handler(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        outcome = _CallOutcome(service, method)
        try:
            async for response in behavior(request_or_iterator, context):
                yield response
        except grpc.aio.AbortError:
            outcome.code = _context_code(context)
            raise
        except asyncio.CancelledError:  # the client went away or the server is stopping
            outcome.code = grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:  # noqa: BLE001
            await _abort_for(exc, outcome, context)
        finally:
            outcome.finish(context)

    return handler


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Error mapping, logging and metrics for every RPC of a server."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method.lstrip("/")
        service, _, method = full.rpartition("/")
        if service.startswith("grpc."):  # health and reflection: not ours to count
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, service, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                _wrap_unary(handler.stream_unary, service, method),
                handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, service, method),
                handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            _wrap_stream(handler.stream_stream, service, method),
            handler.request_deserializer, handler.response_serializer)
