"""Keyset pagination over (created_at, id), newest first, with opaque page tokens (AIP-158), for every
listing of the mesh (images, jobs).

A token names the last row of the previous page; the next page holds the rows strictly "older" than it
in (created_at DESC, id DESC) order. Unlike OFFSET, rows inserted meanwhile cannot shift a page, so every
row that existed when the listing began is returned exactly once. A token also carries the listing's
``scope`` (its filter), and continues only a listing of the same scope.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from mesh.kit import errors

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500
_TOKEN_VERSION: Final = 1


@dataclass(frozen=True)
class Cursor:
    """The position after which the next page starts."""

    created_at: datetime
    id: uuid.UUID
    scope: str = ""
    """What the listing was filtered by ("" for nothing)."""


def page_size(requested: int) -> int:
    """0 means the default; larger than the maximum is reduced to it (AIP-158)."""
    if requested < 0:
        raise errors.InvalidArgument(
            f"page_size {requested} is negative; send 1 to {MAX_PAGE_SIZE}, or 0 for {DEFAULT_PAGE_SIZE}",
            field_violations=[errors.FieldViolation("page_size", "must not be negative")],
        )
    return DEFAULT_PAGE_SIZE if requested == 0 else min(requested, MAX_PAGE_SIZE)


def encode_page_token(cursor: Cursor) -> str:
    """An opaque, URL-safe token for ``cursor``."""
    payload = {
        "v": _TOKEN_VERSION,
        "t": cursor.created_at.isoformat(),
        "i": str(cursor.id),
        "s": cursor.scope,
    }
    raw = json.dumps(payload, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


MAX_TOKEN_CHARS = 512
"""Tokens we issue are about 150 characters; a longer one is refused before it is decoded (deeply nested JSON
in a forged token exhausted the parser's recursion)."""


def describe_listing(scope: str) -> str:
    """A scope for people: ``jobs:QUEUED`` is "QUEUED jobs", ``images`` "all images". A scope names what is
    listed and, after a colon, its filter, so that no token continues a listing of another kind."""
    kind, _, only = scope.partition(":")
    if not kind:
        return "a listing of an earlier version"
    return f"{only} {kind}" if only else f"all {kind}"


def decode_page_token(
    token: str, scope: str, *, describe: Callable[[str], str] = describe_listing
) -> Cursor | None:
    """The cursor in ``token`` (None for an empty token); InvalidArgument naming page_token when it is not one
    this service issued, or when it continues a listing of another ``scope`` (each named by ``describe``)."""
    if not token:
        return None
    try:
        if len(token) > MAX_TOKEN_CHARS:
            raise ValueError("too long")
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        if payload.get("v") != _TOKEN_VERSION:
            raise ValueError("unknown version")
        created_at = datetime.fromisoformat(payload["t"])
        if created_at.tzinfo is None:
            raise ValueError("no time zone")
        cursor = Cursor(created_at, uuid.UUID(payload["i"]), str(payload.get("s", "")))
    except (
        binascii.Error,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        UnicodeDecodeError,
        RecursionError,
    ):
        raise errors.InvalidArgument(
            "page_token is not a token this service issued; pass next_page_token from the previous "
            "response unchanged, or leave it empty for the first page",
            field_violations=[errors.FieldViolation("page_token", "malformed or from another listing")],
        ) from None
    if cursor.scope != scope:
        raise errors.InvalidArgument(
            f"page_token continues the listing of {describe(cursor.scope)}, not of {describe(scope)}; send the"
            " same filter with it, or start again without a token",
            field_violations=[errors.FieldViolation("page_token", "issued for another filter")],
        )
    return cursor
