"""Required request fields, the same way in every service.

An empty id or name is a malformed request, not a lookup that found nothing: it answers
INVALID_ARGUMENT naming the field (ErrorInfo `field`), the convention of every loraplex API,
so a client can tell "you forgot the id" from "that id does not exist".
"""

from __future__ import annotations

from services.common.errors import InvalidArgument


def require(value: str, field: str) -> str:
    if not value:
        raise InvalidArgument(f"{field} is required", reason="MISSING_FIELD", field=field)
    return value
