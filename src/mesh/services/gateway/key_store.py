"""API keys in PostgreSQL, stored as SHA-256 hashes; created, listed and revoked by the ``keys`` command."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from mesh.kit.db import database_unavailable, prepare_database
from mesh.kit.migrations import SchemaMigrations

COMPONENT = "gateway"
MIGRATIONS = "mesh.services.gateway.migrations"
KEY_PREFIX = "mesh_"
LOOKUP_TIMEOUT_SECONDS = 2.0
"""How long a request waits for a pooled connection to check its key: with PostgreSQL away the answer is a
503 within seconds, not a 500 after the pool's own wait (5 s, and more while it reconnects)."""


def hash_key(key: str) -> str:
    """The stored form of a key: lower-case hex SHA-256 (keys are random, so no salt is needed)."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key: ``mesh_`` and 256 bits of URL-safe randomness."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


@dataclass(frozen=True)
class ApiKey:
    """One key's record (never the key itself)."""

    id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


async def migrate(url: str, *, timeout: float | None = 60.0) -> None:
    """Create the database if needed and apply the gateway's migrations, retrying connection failures for
    ``timeout`` seconds (the ``keys`` command; the gateway migrates in the background, with
    :class:`~mesh.kit.migrations.SchemaMigrations`)."""
    await prepare_database(url, COMPONENT, MIGRATIONS, timeout=timeout)


class KeyStore:
    """Lookups and administration of API keys through a connection pool."""

    def __init__(
        self,
        pool: AsyncConnectionPool,
        *,
        lookup_timeout: float = LOOKUP_TIMEOUT_SECONDS,
        migrations: SchemaMigrations | None = None,
    ) -> None:
        self._pool = pool
        self._lookup_timeout = lookup_timeout
        self._migrations = migrations
        """The gateway's migrations, when they may still be running: lookups are refused until they are in (503,
        retryable), rather than meet a missing table (500)."""

    async def create(self, name: str) -> tuple[ApiKey, str]:
        """Store a new key named ``name``; returns its record and the key (shown once)."""
        key = new_key()
        key_id = str(uuid.uuid4())
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "INSERT INTO gateway_api_keys (id, name, key_hash, prefix) VALUES (%s, %s, %s, %s)"
                " RETURNING created_at",
                (key_id, name, hash_key(key), key[: len(KEY_PREFIX) + 6]),
            )
            row = await cursor.fetchone()
        assert row is not None
        return ApiKey(key_id, name, key[: len(KEY_PREFIX) + 6], row[0], None), key

    async def revoke(self, id_or_name: str) -> int:
        """Revoke the key with this id, or every active key with this name; returns how many."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE gateway_api_keys SET revoked_at = now()"
                " WHERE revoked_at IS NULL AND (id::text = %s OR name = %s)",
                (id_or_name, id_or_name),
            )
            return cursor.rowcount

    async def list(self) -> list[ApiKey]:
        """Every key, newest first."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT id::text, name, prefix, created_at, revoked_at FROM gateway_api_keys"
                " ORDER BY created_at DESC, id"
            )
            rows = await cursor.fetchall()
        return [ApiKey(*row) for row in rows]

    async def lookup(self, key: str) -> str | None:
        """The id of the active key ``key``, or None; UNAVAILABLE (503, retryable) while PostgreSQL is away or
        the key table is not migrated yet."""
        if self._migrations is not None:
            self._migrations.require()
        try:
            async with self._pool.connection(timeout=self._lookup_timeout) as conn:
                cursor = await conn.execute(
                    "SELECT id::text FROM gateway_api_keys WHERE key_hash = %s AND revoked_at IS NULL",
                    (hash_key(key),),
                )
                row = await cursor.fetchone()
        except (PoolTimeout, psycopg.OperationalError) as error:
            raise database_unavailable("the API key database", error) from error
        return None if row is None else str(row[0])
