"""Required request fields, the same way in every service.

An empty id or name is a malformed request, not a lookup that found nothing: it answers
INVALID_ARGUMENT naming the field (ErrorInfo `field`), the convention of every loraplex API,
so a client can tell "you forgot the id" from "that id does not exist".

Client-chosen request ids (tracing ids, idempotency keys) end up in logs, database keys and
calls to other services, so they are held to printable ASCII without spaces, at most 128.
"""

from __future__ import annotations

import re

from services.common.errors import InvalidArgument

REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")
#: The longest deployment or base model name (the Registry's rule; the router refuses longer
#: model names without asking it).
MAX_MODEL_NAME = 128


def require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", reason="MISSING_FIELD", field=field)
    return value


def check_request_id(value: str, field: str = "request_id") -> str:
    if not REQUEST_ID.fullmatch(value):
        raise InvalidArgument(f"{field} must be 1-128 printable ASCII characters without spaces",
                              reason="BAD_REQUEST_ID", field=field)
    return value
