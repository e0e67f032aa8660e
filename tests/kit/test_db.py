"""mesh.kit.db against the real PostgreSQL: creating the database, migrations, and the health check of a pool."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import psycopg
import psycopg_pool
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mesh.kit.db import (
    CONNECTION_KWARGS,
    DatabaseCannotBeCreated,
    DatabaseStalled,
    PostgresCheck,
    create_pool,
    database_unavailable,
    ensure_database,
    load_migrations,
    migrate,
    prepare_database,
    retrying,
)
from mesh.kit.errors import NO_RETRY_PUSHBACK
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


async def test_retrying_with_its_time_already_spent_gives_up_without_starting_the_operation() -> None:
    """A caller whose time passed while it waited behind other work (a submit queued behind a batch PostgreSQL
    left unanswered) is DatabaseStalled at once, and its operation is not started: cut off at once, a started
    attempt could still send its statement, and a job could commit after its caller was told UNAVAILABLE."""
    started: list[bool] = []

    async def operation() -> None:
        started.append(True)

    with pytest.raises(DatabaseStalled):
        await retrying(operation, timeout=0)
    await asyncio.sleep(0.01)  # a started attempt has run by now
    assert started == []


# --- ensure_database: the maintenance database only when the service's own cannot be reached -------------

_SSL_REQUEST, _GSSENC_REQUEST = 80877103, 80877104


def _fatal(sqlstate: str, message: str) -> bytes:
    """A PostgreSQL ErrorResponse."""
    body = b"SFATAL\0VFATAL\0C" + sqlstate.encode() + b"\0M" + message.encode() + b"\0\0"
    return b"E" + (len(body) + 4).to_bytes(4, "big") + body


@contextlib.asynccontextmanager
async def maintenance_database_refused(url: str) -> AsyncIterator[str]:
    """``url`` through a proxy that refuses connections to the ``postgres`` database, as pg_hba.conf does where
    the mesh's role may reach only its own database (or a pooler that lists only that one), and passes the
    others through."""
    params = conninfo_to_dict(url)
    host, port = str(params.get("host") or "localhost"), int(params.get("port") or 5432)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # the startup packet, after any encryption requests (declined)
            length = int.from_bytes(await reader.readexactly(4), "big")
            packet = await reader.readexactly(length - 4)
            if int.from_bytes(packet[:4], "big") not in (_SSL_REQUEST, _GSSENC_REQUEST):
                break
            writer.write(b"N")
            await writer.drain()
        fields = packet[4:].split(b"\0")
        startup = dict(zip(fields[0::2], fields[1::2], strict=False))
        if startup.get(b"database", startup.get(b"user")) == b"postgres":
            writer.write(_fatal("28000", 'no pg_hba.conf entry for database "postgres" (test proxy)'))
            await writer.drain()
            writer.close()
            return
        server_reader, server = await asyncio.open_connection(host, port)
        server.write(length.to_bytes(4, "big") + packet)
        await asyncio.gather(pipe(reader, server), pipe(server_reader, writer))

    proxy = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield make_conninfo(url, host="127.0.0.1", port=str(proxy.sockets[0].getsockname()[1]))
    finally:
        proxy.close()


async def _role_of(url: str) -> str:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        return conn.info.user


async def test_a_role_kept_out_of_the_postgres_database_starts_on_its_own_existing_database(
    database_url: str,
) -> None:
    """Where the role may not connect to the `postgres` maintenance database (pg_hba.conf, a pooler), a service
    whose database exists creates nothing and migrates: it connects to its own database first. It connected
    to `postgres` first on every start before, so every service failed to start in such a setup."""
    async with maintenance_database_refused(database_url) as url:
        with pytest.raises(psycopg.OperationalError, match='database "postgres"'):
            await psycopg.AsyncConnection.connect(make_conninfo(url, dbname="postgres"))
        assert await ensure_database(url) is False
        await prepare_database(url, "queue", "mesh.services.queue.migrations", timeout=5)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute("SELECT count(*) FROM schema_migrations WHERE component = 'queue'")
        assert (await cursor.fetchone()) == (len(load_migrations("mesh.services.queue.migrations")),)


async def test_a_missing_database_the_role_cannot_reach_postgres_to_create_is_named_with_the_role(
    database_url: str,
) -> None:
    """A missing database whose role may not reach the `postgres` database to create it fails with an error
    that says so, naming the database and the role; it was the maintenance database's connection error alone."""
    absent = f"mesh_test_absent_{uuid.uuid4().hex[:8]}"
    role = await _role_of(database_url)
    async with maintenance_database_refused(make_conninfo(database_url, dbname=absent)) as url:
        with pytest.raises(DatabaseCannotBeCreated) as raised:
            await ensure_database(url)
    message = str(raised.value)
    assert message.startswith(f'database "{absent}" does not exist, and role "{role}" cannot create it (')
    assert 'no pg_hba.conf entry for database "postgres" (test proxy)' in message


async def test_a_missing_database_the_role_may_not_create_is_named_with_the_role(
    postgres_admin_url: str,
) -> None:
    """A missing database whose role lacks CREATEDB fails with an error naming the database and the role (it
    was a bare 'permission denied to create database'); a role that may create it gets it created."""
    role = f"mesh_test_nocreate_{uuid.uuid4().hex[:8]}"
    absent = f"mesh_test_absent_{uuid.uuid4().hex[:8]}"
    async with await psycopg.AsyncConnection.connect(postgres_admin_url, autocommit=True) as admin:
        await admin.execute(sql.SQL("CREATE ROLE {} LOGIN NOCREATEDB").format(sql.Identifier(role)))
        try:
            with pytest.raises(DatabaseCannotBeCreated) as raised:
                await ensure_database(make_conninfo(postgres_admin_url, user=role, dbname=absent))
            assert str(raised.value).startswith(
                f'database "{absent}" does not exist, and role "{role}" cannot create it ('
                "permission denied to create database)"
            )
            assert await ensure_database(make_conninfo(postgres_admin_url, dbname=absent)) is True
            assert await ensure_database(make_conninfo(postgres_admin_url, dbname=absent)) is False
        finally:
            await admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(absent))
            )
            await admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))


def test_a_database_error_after_the_services_own_wait_tells_channels_not_to_retry_at_once() -> None:
    """No pool connection within its timeout, an attempt given up as stalled, or retrying() spent: the wait
    was had, and the UNAVAILABLE carries gRPC's no-retry pushback; a first dropped connection does not."""

    def pushback(error: Exception, retried: bool = False) -> bool:
        status = database_unavailable("the image database", error, retried=retried).grpc_status()
        return (NO_RETRY_PUSHBACK, "-1") in status.trailing_metadata

    assert pushback(psycopg_pool.PoolTimeout("couldn't get a connection after 5.00 sec"))
    assert pushback(DatabaseStalled("PostgreSQL did not answer within 10s"))
    assert pushback(psycopg.OperationalError("server closed the connection"), retried=True)
    assert not pushback(psycopg.OperationalError("server closed the connection"))
