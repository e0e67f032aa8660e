"""The image repository on PostgreSQL (psycopg 3, async pool).

Rows and blob files stay consistent through per-digest advisory locks held inside a transaction:

* upload: lock the digests, write any missing blob file, insert the row, commit (the lock goes with it);
* delete: delete the row and commit; then lock the digests, and remove each blob file that no row refers
  to any more (the reference count is a SQL query, under the lock).

A concurrent upload of the same bytes therefore either finds its blob removed and writes it again, or
inserts its row first so that the delete keeps the blob. A crash between a delete's commit and the blob's
removal leaves an unreferenced blob (wasted space, never a dangling row).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from mesh.kit.db import database_unavailable, transaction_once
from mesh.kit.pagination import Cursor
from mesh.services.file.models import ImageRecord, NewImage

T = TypeVar("T")

_COLUMNS = (
    "id, filename, content_type, format, width, height, channels, bit_depth, size_bytes, sha256, "
    "thumbnail_sha256, thumbnail_content_type, labels, idempotency_key, created_at"
)


def lock_key(namespace: str, value: str) -> int:
    """A signed 64-bit advisory-lock key for ``value`` in ``namespace``."""
    digest = hashlib.sha256(f"mesh.file:{namespace}:{value}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class PostgresImageRepository:
    """Image records in the ``images`` table (see ``migrations/``).

    The two writes, insert and delete, take effect at most once (:func:`~mesh.kit.db.transaction_once`): when
    the answer to their COMMIT is lost, they ask PostgreSQL whether it committed rather than answer
    UNAVAILABLE, which the channels' retry policy would send again (a second, hidden image for an insert; 404
    for a delete that succeeded). ``retry_timeout`` bounds that, and their retries on dropped connections.
    """

    def __init__(self, pool: AsyncConnectionPool, *, retry_timeout: float = 5.0) -> None:
        self.pool = pool
        self.retry_timeout = retry_timeout

    async def insert(
        self, image: NewImage, *, store_blobs: Callable[[], Awaitable[bool]]
    ) -> tuple[ImageRecord, bool]:
        keys = [lock_key("blob", d) for d in _digests(image.sha256, image.thumbnail_sha256)]
        if image.idempotency_key:
            keys.append(lock_key("idempotency", image.idempotency_key))

        async def body(cursor: psycopg.AsyncCursor[dict[str, Any]]) -> tuple[ImageRecord, bool]:
            await _lock(cursor, keys)
            if image.idempotency_key:
                existing = await _fetch_one(
                    cursor,
                    f"SELECT {_COLUMNS} FROM images WHERE idempotency_key = %s",
                    (image.idempotency_key,),
                )
                if existing is not None:
                    return existing, True
            deduplicated = await store_blobs()
            record = await _fetch_one(
                cursor,
                f"INSERT INTO images ({_COLUMNS.removesuffix(', created_at')}) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
                f"RETURNING {_COLUMNS}",
                (
                    image.id,
                    image.filename,
                    image.content_type,
                    image.format,
                    image.width,
                    image.height,
                    image.channels,
                    image.bit_depth,
                    image.size_bytes,
                    image.sha256,
                    image.thumbnail_sha256,
                    image.thumbnail_content_type,
                    Jsonb(image.labels),
                    image.idempotency_key,
                ),
            )
            assert record is not None  # INSERT ... RETURNING always returns the row
            return record, deduplicated

        return await self._once(body)

    async def get(self, image_id: uuid.UUID) -> ImageRecord | None:
        async with self._transaction() as cursor:
            return await _fetch_one(cursor, f"SELECT {_COLUMNS} FROM images WHERE id = %s", (image_id,))

    async def find_by_idempotency_key(self, key: str) -> ImageRecord | None:
        async with self._transaction() as cursor:
            return await _fetch_one(
                cursor, f"SELECT {_COLUMNS} FROM images WHERE idempotency_key = %s", (key,)
            )

    async def list_page(self, limit: int, after: Cursor | None) -> list[ImageRecord]:
        async with self._transaction() as cursor:
            if after is None:
                await cursor.execute(
                    f"SELECT {_COLUMNS} FROM images ORDER BY created_at DESC, id DESC LIMIT %s", (limit,)
                )
            else:
                await cursor.execute(
                    f"SELECT {_COLUMNS} FROM images WHERE (created_at, id) < (%s, %s) "
                    "ORDER BY created_at DESC, id DESC LIMIT %s",
                    (after.created_at, after.id, limit),
                )
            return [_record(row) for row in await cursor.fetchall()]

    async def delete(self, image_id: uuid.UUID) -> ImageRecord | None:
        async def body(cursor: psycopg.AsyncCursor[dict[str, Any]]) -> ImageRecord | None:
            return await _fetch_one(
                cursor, f"DELETE FROM images WHERE id = %s RETURNING {_COLUMNS}", (image_id,)
            )

        return await self._once(body)

    async def release_blobs(
        self, digests: Sequence[str], *, remove: Callable[[str], Awaitable[bool]]
    ) -> list[str]:
        removed: list[str] = []
        async with self._transaction() as cursor:
            await _lock(cursor, [lock_key("blob", d) for d in set(digests)])
            for digest in digests:
                await cursor.execute(
                    "SELECT EXISTS (SELECT 1 FROM images WHERE sha256 = %s) "
                    "OR EXISTS (SELECT 1 FROM images WHERE thumbnail_sha256 = %s) AS referenced",
                    (digest, digest),
                )
                row = await cursor.fetchone()
                if (
                    row is not None
                    and not row["referenced"]
                    and await _finish_despite_cancellation(remove(digest))
                ):
                    removed.append(digest)
        return removed

    async def count(self) -> int:
        """How many images are stored."""
        async with self._transaction() as cursor:
            await cursor.execute("SELECT count(*) AS n FROM images")
            row = await cursor.fetchone()
            return int(row["n"]) if row else 0

    async def _once(self, body: Callable[[psycopg.AsyncCursor[dict[str, Any]]], Awaitable[T]]) -> T:
        """``body`` on a cursor in a transaction that takes effect at most once (see the class)."""

        async def on_connection(conn: psycopg.AsyncConnection[Any]) -> T:
            async with conn.cursor(row_factory=dict_row) as cursor:
                return await body(cursor)

        try:
            return await transaction_once(
                self.pool, on_connection, what="the image database", timeout=self.retry_timeout
            )
        except psycopg.errors.UndefinedTable as error:
            raise database_unavailable("the image database", error) from error

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[psycopg.AsyncCursor[dict[str, Any]]]:
        """A cursor in a transaction; PostgreSQL being unreachable becomes Unavailable (retryable)."""
        try:
            async with (
                self.pool.connection() as conn,
                conn.transaction(),
                conn.cursor(row_factory=dict_row) as cursor,
            ):
                yield cursor
        except (PoolTimeout, psycopg.OperationalError, psycopg.errors.UndefinedTable) as error:
            raise database_unavailable("the image database", error) from error


async def _finish_despite_cancellation(removal: Awaitable[bool]) -> bool:
    """Await ``removal`` to its end even when cancelled meanwhile, and only then raise the cancellation.

    A blob is removed in a thread, which a cancellation does not stop: were the transaction (and with it the
    digest's lock) given up at once, an upload of the same bytes could find the blob still there and record
    its row, and the thread would then unlink the blob from under it.
    """
    task = asyncio.ensure_future(removal)
    cancellation: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as error:
            cancellation = error
    if cancellation is not None:
        if not task.cancelled():
            task.exception()  # retrieved, not logged as lost: the caller gets the cancellation
        raise cancellation
    return task.result()


def _digests(*values: str | None) -> list[str]:
    return sorted({v for v in values if v})


async def _lock(cursor: psycopg.AsyncCursor[dict[str, Any]], keys: Iterable[int]) -> None:
    """Take transaction-scoped advisory locks in one global order, so two transactions cannot deadlock."""
    for key in sorted(set(keys)):
        await cursor.execute("SELECT pg_advisory_xact_lock(%s)", (key,))


async def _fetch_one(
    cursor: psycopg.AsyncCursor[dict[str, Any]], query: str, params: Sequence[object]
) -> ImageRecord | None:
    await cursor.execute(query.encode(), params)
    row = await cursor.fetchone()
    return None if row is None else _record(row)


def _record(row: dict[str, Any]) -> ImageRecord:
    return ImageRecord(
        id=row["id"],
        filename=row["filename"],
        content_type=row["content_type"],
        format=row["format"],
        width=row["width"],
        height=row["height"],
        channels=row["channels"],
        bit_depth=row["bit_depth"],
        size_bytes=row["size_bytes"],
        sha256=row["sha256"],
        thumbnail_sha256=row["thumbnail_sha256"],
        thumbnail_content_type=row["thumbnail_content_type"],
        labels=dict(row["labels"] or {}),
        idempotency_key=row["idempotency_key"],
        created_at=row["created_at"],
    )
