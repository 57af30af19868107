"""Reading `authorization: Bearer <token>` metadata, the same way in every service."""

from __future__ import annotations

import hmac

from services.common.errors import PermissionDenied, Unauthenticated


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


def authorization_of(context) -> str | None:
    """The `authorization` metadata of a gRPC call (keys are case-insensitive), if any."""
    for key, value in context.invocation_metadata() or ():
        if key.lower() == "authorization":
            return value
    return None


def require_admin(admin_token: str, context, service: str) -> None:
    """UNAUTHENTICATED without credentials, PERMISSION_DENIED with any token but the admin's.
    An empty admin_token means the service was started without one: nothing to check."""
    if not admin_token:
        return
    token = bearer_token(authorization_of(context), "admin token")
    if not is_admin_token(admin_token, token):
        raise PermissionDenied(f"the {service} needs the admin token", reason="ADMIN_ONLY")
