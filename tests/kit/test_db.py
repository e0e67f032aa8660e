"""mesh.kit.db against the real PostgreSQL: migrations, and the health check of a pool."""

from __future__ import annotations

import asyncio
import contextlib

import psycopg
import psycopg_pool
import pytest

from mesh.kit.db import CONNECTION_KWARGS, PostgresCheck, create_pool, migrate
from mesh.services.queue.repository import open_pool


async def test_components_migrating_at_once_on_a_fresh_database_all_succeed(database_url: str) -> None:
    """Services starting together on an empty database (as `make up` does) each apply their migrations;
    none fails on the shared schema_migrations table being created by another at the same moment."""
    components = {
        "file": "mesh.services.file.migrations",
        "queue": "mesh.services.queue.migrations",
        "gateway": "mesh.services.gateway.migrations",
    }
    # Queue twice: image processing and inference both apply the queue's migrations when they start.
    runs = [*components.items(), ("queue", components["queue"])]
    applied = await asyncio.gather(*(migrate(database_url, name, package) for name, package in runs))
    assert all(isinstance(names, list) for names in applied)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        rows = await (
            await conn.execute("SELECT component, count(*) FROM schema_migrations GROUP BY component")
        ).fetchall()
    assert {component for component, _ in rows} == set(components)
    assert sum(len(names) for names in applied) == sum(count for _, count in rows)


async def test_a_busy_pool_is_healthy_and_an_unreachable_database_is_not(database_url: str) -> None:
    """Every connection of the service's pool in use (a burst of requests) is reported as a busy pool, not as
    PostgreSQL failing, which made the service unready while PostgreSQL was well; an unreachable server fails
    the check within its timeout."""
    async with create_pool(database_url, name="busy", min_size=1, max_size=2) as pool:
        await pool.wait()
        async with pool.connection() as first, pool.connection() as second:
            assert first is not second
            detail = await asyncio.wait_for(PostgresCheck(pool).check(), 2.0)
        assert detail == "pool busy: all 2 connections in use"
        assert (await PostgresCheck(pool).check()).startswith("pool ")
    async with create_pool("postgresql://postgres@127.0.0.1:1/none", name="down", max_size=2) as down:
        with pytest.raises(psycopg.OperationalError):
            await asyncio.wait_for(PostgresCheck(down, timeout=0.5).check(), 5.0)


async def test_a_small_pool_that_cannot_connect_is_not_reported_busy() -> None:
    """With PostgreSQL away, the connections a pool is trying to open count in its size: with callers waiting,
    a pool of 2 looked full and busy, and the check said 'pool busy' for the whole outage. A connection of the
    check's own now finds PostgreSQL away."""
    async with create_pool("postgresql://postgres@127.0.0.1:1/none", name="down-busy", max_size=2) as down:

        async def wait_for_a_connection() -> None:
            with contextlib.suppress(psycopg_pool.PoolTimeout):
                async with down.connection(timeout=3):
                    pass

        callers = [asyncio.create_task(wait_for_a_connection()) for _ in range(4)]
        await asyncio.sleep(0.3)
        stats = down.get_stats()
        assert (stats["pool_size"], stats["pool_available"]) == (2, 0)  # what looked like a busy pool
        with pytest.raises((psycopg.OperationalError, TimeoutError)):
            await asyncio.wait_for(PostgresCheck(down, timeout=0.5).check(), 5.0)
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)


@pytest.mark.parametrize("factory", ["kit", "queue"])
async def test_pooled_connections_give_up_on_a_silent_path_within_about_30_seconds(
    database_url: str, factory: str
) -> None:
    """Both pool factories open connections with TCP keepalives (15 s idle, then 3 probes 5 s apart) and a 30 s
    TCP user timeout, so a connection whose path went silent is dropped and replaced instead of hanging its
    caller for the OS's two hours (a streamed upload, which has no deadline, hung on one)."""
    pool = (
        create_pool(database_url, name="test-keepalive")
        if factory == "kit"
        else open_pool(database_url, name="test-keepalive", max_size=1)
    )
    async with pool, pool.connection() as conn:
        options = {o.keyword.decode(): (o.val or b"").decode() for o in conn.pgconn.info}
    assert {k: options[k] for k in CONNECTION_KWARGS} == {
        "keepalives": "1",
        "keepalives_idle": "15",
        "keepalives_interval": "5",
        "keepalives_count": "3",
        "tcp_user_timeout": "30000",
    }
