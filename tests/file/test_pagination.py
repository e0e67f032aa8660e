"""Property tests of ListImages' keyset pagination on the real PostgreSQL."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.kit.db import create_pool, prepare_database
from mesh.services.file.blobs import BlobStore
from mesh.services.file.models import ImageRecord, NewImage
from mesh.services.file.postgres import PostgresImageRepository
from mesh.services.file.server import MIGRATIONS
from mesh.services.file.store import ImageStore

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def repository(database_url: str) -> AsyncIterator[PostgresImageRepository]:
    """A repository on a migrated database of this module."""
    await prepare_database(database_url, "file", MIGRATIONS)
    async with create_pool(database_url, name="file-test", max_size=4) as pool:
        yield PostgresImageRepository(pool)


async def _nothing_to_store() -> bool:
    return False


async def insert(repository: PostgresImageRepository, count: int) -> list[ImageRecord]:
    """Record ``count`` images (rows only; these tests need no blobs)."""
    store_blobs: Callable[[], Awaitable[bool]] = _nothing_to_store
    records = []
    for _ in range(count):
        image_id = uuid.uuid4()
        digest = hashlib.sha256(image_id.bytes).hexdigest()
        new = NewImage(
            id=image_id,
            filename="p.png",
            content_type="image/png",
            format="PNG",
            width=1,
            height=1,
            channels=1,
            bit_depth=8,
            size_bytes=1,
            sha256=digest,
            thumbnail_sha256=None,
            thumbnail_content_type="",
        )
        records.append((await repository.insert(new, store_blobs=store_blobs))[0])
    return records


async def reset(repository: PostgresImageRepository, initial: int, tied: list[bool]) -> set[uuid.UUID]:
    """Empty the table, insert ``initial`` images, and give those flagged in ``tied`` one shared timestamp."""
    async with repository.pool.connection() as conn:
        await conn.execute("TRUNCATE images")
    records = await insert(repository, initial)
    tied_ids = [r.id for r, flag in zip(records, tied, strict=False) if flag]
    if tied_ids:
        async with repository.pool.connection() as conn:
            # Same instant for several rows: only the id tie-breaker orders them.
            await conn.execute(
                "UPDATE images SET created_at = '2020-02-02T02:02:02.020202Z' WHERE id = ANY(%s)", (tied_ids,)
            )
    return {r.id for r in records}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    initial=st.integers(0, 25),
    page=st.integers(1, 8),
    tied=st.lists(st.booleans(), max_size=25),
    inserts=st.lists(st.integers(0, 3), max_size=10),
)
async def test_every_image_exactly_once_newest_first_while_inserting(
    repository: PostgresImageRepository,
    tmp_path: Path,
    initial: int,
    page: int,
    tied: list[bool],
    inserts: list[int],
) -> None:
    """Paging sees every image that existed at the start exactly once, newest first by (created_at, id),
    never more than page_size per page, and none of the images inserted between pages."""
    store = ImageStore(repository, BlobStore.opened(tmp_path))
    existing = await reset(repository, initial, tied)
    seen: list[ImageRecord] = []
    token = ""
    pages = 0
    while True:
        result = await store.list(page, token)
        pages += 1
        assert len(result.images) <= page
        seen.extend(result.images)
        token = result.next_page_token
        if not token:
            break
        assert len(result.images) == page  # only the last page may be short
        await insert(repository, inserts[(pages - 1) % len(inserts)] if inserts else 0)
    ids = [r.id for r in seen]
    assert len(ids) == len(set(ids)), "an image was returned twice"
    assert set(ids) == existing, "an image was skipped, or a new one slipped in behind the cursor"
    keys = [(r.created_at, r.id) for r in seen]
    assert keys == sorted(keys, reverse=True), "not newest first"
    assert pages == max(1, -(-initial // page))


async def test_new_images_appear_first_on_a_fresh_listing(
    repository: PostgresImageRepository, tmp_path: Path
) -> None:
    """An image inserted after a listing began is on the first page of the next listing."""
    store = ImageStore(repository, BlobStore.opened(tmp_path))
    await reset(repository, 5, [])
    first_page = await store.list(2, "")
    [newest] = await insert(repository, 1)
    assert newest.id not in {r.id for r in first_page.images}
    assert (await store.list(2, "")).images[0].id == newest.id
