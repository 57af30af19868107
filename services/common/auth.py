"""Reading `authorization: Bearer <token>` metadata, the same way in every service."""

from __future__ import annotations

import hmac

from services.common.errors import Unauthenticated


def bearer_token(authorization: str | None, credential: str = "token") -> str:
    """The token of an `authorization` value; UNAUTHENTICATED when absent or malformed.
    `credential` names what the caller should send (e.g. "API key") in the message."""
    if not authorization:
        raise Unauthenticated(f"missing credentials: send 'authorization: Bearer <{credential}>' metadata",
                              reason="MISSING_CREDENTIALS")
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated(f"malformed authorization metadata: expected 'Bearer <{credential}>'",
                              reason="MALFORMED_CREDENTIALS")
    return token.strip()


def is_admin_token(admin_token: str, token: str) -> bool:
    """Constant-time comparison; an empty configured admin token never matches."""
    return bool(admin_token) and hmac.compare_digest(token.encode(), admin_token.encode())
