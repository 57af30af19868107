"""Domain errors: what went wrong, in words a caller can act on.

Domain code raises these and never imports grpc; services/common/rpc.py maps each class to
its gRPC status code (see the conventions in protos/loraplex/common/v1/generation.proto).
"""

from __future__ import annotations


class LoraplexError(Exception):
    """Base class. `reason` is a stable UPPER_SNAKE code for machines; `metadata` adds
    context such as the offending field and expected/actual values."""

    default_reason = "ERROR"

    def __init__(self, message: str, *, reason: str | None = None, **metadata: object) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {key: str(value) for key, value in metadata.items()}


class InvalidArgument(LoraplexError):
    default_reason = "INVALID_ARGUMENT"


class NotFound(LoraplexError):
    default_reason = "NOT_FOUND"


class AlreadyExists(LoraplexError):
    default_reason = "ALREADY_EXISTS"


class PermissionDenied(LoraplexError):
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(LoraplexError):
    default_reason = "UNAUTHENTICATED"


class FailedPrecondition(LoraplexError):
    default_reason = "FAILED_PRECONDITION"


class OutOfRange(LoraplexError):
    default_reason = "OUT_OF_RANGE"


class Unavailable(LoraplexError):
    default_reason = "UNAVAILABLE"


#: Reasons of an UNAVAILABLE that blame what a service depends on, not the service: an inference
#: node whose Registry cannot send an adapter still serves everything else, so a router tries
#: another node for that request without taking this one out of service.
REGISTRY_UNAVAILABLE, ADAPTER_CORRUPTED = "REGISTRY_UNAVAILABLE", "ADAPTER_CORRUPTED"
DEPENDENCY_REASONS = frozenset({REGISTRY_UNAVAILABLE, ADAPTER_CORRUPTED})


class Unimplemented(LoraplexError):
    default_reason = "UNIMPLEMENTED"


class ResourceExhausted(LoraplexError):
    """Too much load or quota spent; `retry_after_s` tells the caller when to try again."""

    default_reason = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kwargs: object) -> None:
        super().__init__(message, **kwargs)
        self.retry_after_s = retry_after_s
