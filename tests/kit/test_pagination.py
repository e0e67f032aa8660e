"""mesh.kit.pagination: page tokens and page sizes of every listing."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.kit import errors
from mesh.kit.pagination import Cursor, decode_page_token, encode_page_token, page_size

_instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@given(_instants, st.uuids(), st.sampled_from(["", "QUEUED", "a|b"]))
def test_tokens_round_trip(created_at: datetime, row_id: uuid.UUID, scope: str) -> None:
    """A token decodes to exactly the cursor it was made from (microseconds and scope included)."""
    cursor = Cursor(created_at, row_id, scope)
    token = encode_page_token(cursor)
    assert token.isascii()
    assert "=" not in token
    assert decode_page_token(token, scope) == cursor


def test_a_token_continues_only_the_listing_of_its_scope() -> None:
    """A token of a filtered listing sent without its filter, or with another, is InvalidArgument naming both
    listings as the service describes them (AIP-158)."""
    token = encode_page_token(Cursor(datetime(2026, 1, 1, tzinfo=UTC), uuid.uuid4(), "jobs:QUEUED"))
    with pytest.raises(errors.InvalidArgument) as caught:
        decode_page_token(token, "jobs")
    assert caught.value.message.startswith("page_token continues the listing of QUEUED jobs, not of all jobs")
    assert [v.field for v in caught.value.field_violations] == ["page_token"]
    with pytest.raises(errors.InvalidArgument, match="of QUEUED jobs, not of FAILED jobs"):
        decode_page_token(token, "jobs:FAILED")


def test_a_token_of_one_kind_of_listing_does_not_continue_another() -> None:
    """An image listing's token sent to ListJobs (both unfiltered) is refused naming both; it was taken, and
    the job listing skipped to the image's time."""
    token = encode_page_token(Cursor(datetime(2026, 1, 1, tzinfo=UTC), uuid.uuid4(), "images"))
    with pytest.raises(errors.InvalidArgument, match="listing of all images, not of all jobs"):
        decode_page_token(token, "jobs")


def test_empty_token_means_first_page() -> None:
    """An empty token is the first page."""
    assert decode_page_token("", "jobs") is None


@pytest.mark.parametrize(
    "token", ["garbage", "!!!", "e30", "eyJ2IjoyfQ", "eyJ2IjoxLCJ0IjoiMjAyMC0wMS0wMSIsImkiOiJ4In0"]
)
def test_malformed_tokens_name_the_field(token: str) -> None:
    """A token this service did not issue is InvalidArgument naming page_token."""
    with pytest.raises(errors.InvalidArgument) as caught:
        decode_page_token(token, "jobs")
    assert [v.field for v in caught.value.field_violations] == ["page_token"]
    assert "next_page_token" in caught.value.message


def test_a_forged_token_of_nested_json_is_invalid_argument_not_a_crash() -> None:
    """A token of thousands of ``[`` (as base64) exhausted the JSON parser's recursion: INTERNAL and a logged
    traceback; it is InvalidArgument naming page_token, like any token this service did not issue."""
    token = base64.urlsafe_b64encode(b"[" * 100_000).decode()
    with pytest.raises(errors.InvalidArgument) as caught:
        decode_page_token(token, "jobs")
    assert [v.field for v in caught.value.field_violations] == ["page_token"]


@pytest.mark.parametrize(("requested", "expected"), [(0, 50), (1, 1), (500, 500), (501, 500), (10_000, 500)])
def test_page_size_default_and_cap(requested: int, expected: int) -> None:
    """0 is the default of 50; more than 500 is reduced to 500."""
    assert page_size(requested) == expected


def test_negative_page_size_is_refused() -> None:
    """A negative page size names the field."""
    with pytest.raises(errors.InvalidArgument, match="page_size"):
        page_size(-1)
