"""Page tokens for listings: keyset pagination, stable under concurrent inserts.

A token is the sort key of the last row returned (base64url JSON, tagged with the listing it
belongs to), so the next page starts strictly after it: no row is skipped or repeated when
rows are added or removed between pages, unlike offsets. Tokens are opaque to clients.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Callable
from typing import Any, TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Page:
    listing: str
    size: int
    after: list[Any] | None = None


def page_request(listing: str, page_size: int = 0, page_token: str = "") -> Page:
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    if not page_token:
        return Page(listing, size)
    try:
        decoded = json.loads(base64.urlsafe_b64decode(page_token.encode() + b"=" * (-len(page_token) % 4)))
        if decoded["l"] != listing or not isinstance(decoded["a"], list):
            raise ValueError
    except (ValueError, KeyError, TypeError, binascii.Error, UnicodeDecodeError):
        raise InvalidArgument("page.page_token is not a token from this listing; pass the next_page_token of the "
                              "previous response unchanged", reason="BAD_PAGE_TOKEN", field="page.page_token") from None
    return Page(listing, size, decoded["a"])


def split(rows: list[T], page: Page, sort_key: Callable[[T], list[Any]]) -> tuple[list[T], str]:
    """The page's rows (the query fetched size + 1) and the token of the next page ("" at the end)."""
    if len(rows) <= page.size:
        return rows, ""
    rows = rows[:page.size]
    token = json.dumps({"l": page.listing, "a": sort_key(rows[-1])}, separators=(",", ":"))
    return rows, base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")
