"""The file service's writes when the answer to their COMMIT is lost: an upload or a delete that committed
answers as it would have, once, instead of UNAVAILABLE, which the channels' retry policy sent again (a second,
hidden image for an upload; NOT_FOUND for a delete that succeeded, with its blob left behind)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest

from mesh.kit.db import create_pool, migrate
from mesh.services.file.models import NewImage
from mesh.services.file.postgres import PostgresImageRepository
from mesh.services.file.server import MIGRATIONS
from tests.postgres import CommitCutter, commit_cutter, sql


@pytest.fixture(scope="module")
async def migrated(database_url: str) -> str:
    await migrate(database_url, "file", MIGRATIONS)
    return database_url


@pytest.fixture
async def proxied(migrated: str) -> AsyncIterator[tuple[CommitCutter, str]]:
    async with commit_cutter(migrated) as proxied:
        yield proxied


@pytest.fixture
async def repository(proxied: tuple[CommitCutter, str]) -> AsyncIterator[PostgresImageRepository]:
    """A repository whose connections go through the cutter."""
    pool = create_pool(proxied[1], name="test-file-commit-cut", max_size=2)
    async with pool:
        yield PostgresImageRepository(pool, retry_timeout=1.5)


def _image(**changes: object) -> NewImage:
    values: dict[str, object] = {
        "id": uuid.uuid4(),
        "filename": "strip.png",
        "content_type": "image/png",
        "format": "PNG",
        "width": 4,
        "height": 4,
        "channels": 3,
        "bit_depth": 8,
        "size_bytes": 100,
        "sha256": uuid.uuid4().hex * 2,
        "thumbnail_sha256": None,
        "thumbnail_content_type": "",
        **changes,
    }
    return NewImage(**values)  # type: ignore[arg-type]


async def _no_blob_stored_before() -> bool:
    return False  # the blob was new: not deduplicated


async def test_an_upload_whose_commit_answer_was_lost_answers_with_its_image_once(
    repository: PostgresImageRepository, proxied: tuple[CommitCutter, str], migrated: str
) -> None:
    """The insert committed unheard: the answer is the image it recorded (its id, not deduplicated), and there
    is one row for it (before: UNAVAILABLE, and the channel's retry inserted a second image)."""
    cutter = proxied[0]
    image = _image()
    cutter.arm("answered")
    record, deduplicated = await repository.insert(image, store_blobs=_no_blob_stored_before)
    assert cutter.fired == 1
    assert (record.id, deduplicated) == (image.id, False)
    rows = await sql(migrated, "SELECT id FROM images WHERE sha256 = %s", image.sha256)
    assert rows == [{"id": image.id}]


async def test_a_delete_whose_commit_answer_was_lost_answers_with_the_deleted_image(
    repository: PostgresImageRepository, proxied: tuple[CommitCutter, str], migrated: str
) -> None:
    """The delete committed unheard: the answer is the deleted image, so the store goes on to release its blobs
    (before: UNAVAILABLE, and the channel's retry answered NOT_FOUND and left the blob behind)."""
    cutter = proxied[0]
    image = _image()
    await repository.insert(image, store_blobs=_no_blob_stored_before)
    cutter.arm("answered")
    deleted = await repository.delete(image.id)
    assert cutter.fired == 1
    assert deleted is not None
    assert deleted.id == image.id
    assert await sql(migrated, "SELECT id FROM images WHERE id = %s", image.id) == []
