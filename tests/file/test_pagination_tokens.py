"""Page tokens and page sizes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.kit import errors
from mesh.services.file.pagination import Cursor, decode_page_token, encode_page_token, page_size

_instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@given(_instants, st.uuids())
def test_tokens_round_trip(created_at: datetime, image_id: uuid.UUID) -> None:
    """A token decodes to exactly the cursor it was made from (microseconds included)."""
    cursor = Cursor(created_at, image_id)
    token = encode_page_token(cursor)
    assert token.isascii()
    assert "=" not in token
    assert decode_page_token(token) == cursor


def test_empty_token_means_first_page() -> None:
    """An empty token is the first page."""
    assert decode_page_token("") is None


@pytest.mark.parametrize(
    "token", ["garbage", "!!!", "e30", "eyJ2IjoyfQ", "eyJ2IjoxLCJ0IjoiMjAyMC0wMS0wMSIsImkiOiJ4In0"]
)
def test_malformed_tokens_name_the_field(token: str) -> None:
    """A token this service did not issue is InvalidArgument naming page_token."""
    with pytest.raises(errors.InvalidArgument) as caught:
        decode_page_token(token)
    assert [v.field for v in caught.value.field_violations] == ["page_token"]
    assert "next_page_token" in caught.value.message


@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (1, 1), (500, 500), (501, 500), (10_000, 500)])
def test_page_size_default_and_cap(requested: int, expected: int) -> None:
    """0 is the default of 50; more than 500 is reduced to 500."""
    assert page_size(requested) == expected


def test_negative_page_size_is_refused() -> None:
    """A negative page size names the field."""
    with pytest.raises(errors.InvalidArgument, match="page_size"):
        page_size(-1)
