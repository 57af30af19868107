"""Page tokens for listings: keyset pagination, stable under concurrent inserts.

A token is the sort key of the last row returned (base64url JSON), so the next page starts
strictly after it: no row is skipped or repeated when rows are added or removed between
pages, unlike offsets. Tokens are opaque to clients.

A token also carries a digest of the query it continues: the listing, its filters and the
caller's tenant scope (`page_request(..., **query)`). A sort key is only a position in *that*
result set; resumed under other filters or by another tenant it would silently skip rows, so
such a token is refused (the PageRequest convention in protos/loraplex/common/v1). The digest
catches mistakes, it is not a secret: a forged token can only move the start within the
caller's own query, because every listing applies its tenant scope itself.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from collections.abc import Callable
from typing import Any, TypeVar

from services.common.errors import InvalidArgument

#: What page_size 0 means; protos/loraplex/common/v1/generation.proto documents it.
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Page:
    listing: str
    size: int
    after: list[Any] | None = None
    #: The digest of the listing and query this page belongs to; next_page_token carries it.
    query: str = ""


def query_digest(listing: str, query: dict[str, Any]) -> str:
    """Order-independent: the same filters given in any order are the same query."""
    canonical = json.dumps([listing, query], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def page_request(listing: str, page_size: int = 0, page_token: str = "", **query: Any) -> Page:
    """The page a List call asks for. `query` names everything that shapes the result set
    besides paging (filters, the caller's tenant scope); a token is accepted only for the
    same listing and query."""
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    digest = query_digest(listing, query)
    if not page_token:
        return Page(listing, size, query=digest)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(page_token.encode() + b"=" * (-len(page_token) % 4)))
        if decoded["q"] != digest or not isinstance(decoded["a"], list):
            raise ValueError
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError, RecursionError):
        raise InvalidArgument("page.page_token does not continue this query (another listing, other filters or "
                              "another caller's token); pass the next_page_token of the previous response unchanged "
                              "with the same request fields", reason="BAD_PAGE_TOKEN",
                              field="page.page_token") from None
    return Page(listing, size, decoded["a"], digest)


def split(rows: list[T], page: Page, sort_key: Callable[[T], list[Any]]) -> tuple[list[T], str]:
    """The page's rows (the query fetched size + 1) and the token of the next page ("" at the end)."""
    if len(rows) <= page.size:
        return rows, ""
    rows = rows[:page.size]
    # A Page built by hand (no page_request) still gets a token its listing accepts.
    digest = page.query or query_digest(page.listing, {})
    token = json.dumps({"q": digest, "a": sort_key(rows[-1])}, separators=(",", ":"))
    return rows, base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
