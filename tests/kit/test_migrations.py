"""mesh.kit.migrations: a service serves before its schema is in place, refusing its API (UNAVAILABLE) and
holding back its loops until then, and migrates in the background once PostgreSQL answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from mesh.kit.interceptors import ServerInterceptor
from mesh.kit.migrations import SchemaMigrations

GATED = "test.Gated"
OTHER = "test.Other"


def _identity(data: bytes) -> bytes:
    return data


async def _say(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    return b"said " + request


async def _count(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
    for number in (b"1", b"2"):
        yield number


def _handlers(service: str) -> grpc.GenericRpcHandler[Any, Any]:
    return grpc.method_handlers_generic_handler(
        service,
        {
            "Say": grpc.unary_unary_rpc_method_handler(_say, _identity, _identity),
            "Count": grpc.unary_stream_rpc_method_handler(_count, _identity, _identity),
        },
    )


async def test_the_gate_refuses_the_api_unavailable_until_the_schema_is_in_place() -> None:
    """Until the migrations are applied, the gated service's calls, unary and streaming, answer UNAVAILABLE
    saying the schema is not in place (a call meeting a missing table was INTERNAL), while another service
    (health, reflection) answers; once they are, every call goes through."""
    migrations = SchemaMigrations("postgresql://127.0.0.1:1/none", "test", "tests.none")
    server = grpc.aio.server(interceptors=[ServerInterceptor(), migrations.gate([GATED])])
    server.add_generic_rpc_handlers([_handlers(GATED), _handlers(OTHER)])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:

            def say(service: str) -> Any:
                return channel.unary_unary(f"/{service}/Say", _identity, _identity)(b"hi", timeout=5)

            async def count(service: str) -> list[bytes]:
                call = channel.unary_stream(f"/{service}/Count", _identity, _identity)(b"", timeout=5)
                return [response async for response in call]

            for refused in (say(GATED), count(GATED)):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await refused
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
                assert raised.value.details() == "the test database schema is not in place yet; retry shortly"
            assert await say(OTHER) == b"said hi"
            migrations.applied.set()
            assert await say(GATED) == b"said hi"
            assert await count(GATED) == [b"1", b"2"]
    finally:
        await server.stop(None)


async def test_wait_returns_true_once_applied_and_false_when_stopping_comes_first() -> None:
    """The loops that use the tables wait for the migrations, and give up waiting when the service stops."""
    migrations = SchemaMigrations("postgresql://127.0.0.1:1/none", "test", "tests.none")
    stopping = asyncio.Event()
    waiting = asyncio.create_task(migrations.wait(stopping))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    migrations.applied.set()
    assert await asyncio.wait_for(waiting, 1) is True

    unapplied = SchemaMigrations("postgresql://127.0.0.1:1/none", "test", "tests.none")
    waiting = asyncio.create_task(unapplied.wait(stopping))
    await asyncio.sleep(0.05)
    stopping.set()
    assert await asyncio.wait_for(waiting, 1) is False


async def test_migrations_fail_as_a_check_until_postgres_answers_then_apply_in_the_background(
    empty_database_url: str, postgres_admin_url: str
) -> None:
    """With the database refusing connections, an attempt fails (the check says why) instead of raising; the
    background loop applies the migrations once the database answers."""
    database = str(conninfo_to_dict(empty_database_url)["dbname"])

    async def allow(allowed: bool) -> None:
        async with await psycopg.AsyncConnection.connect(postgres_admin_url, autocommit=True) as admin:
            await admin.execute(
                sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                    sql.Identifier(database), sql.Literal(allowed)
                )
            )

    migrations = SchemaMigrations(
        empty_database_url, "gateway", "mesh.services.gateway.migrations", retry_seconds=0.2
    )
    await allow(False)
    try:
        assert await migrations.try_once(timeout=0.2) is False
        with pytest.raises(RuntimeError, match="database schema not migrated yet: OperationalError: "):
            await migrations.check()
        stopping = asyncio.Event()
        background = asyncio.create_task(migrations.run_until_applied(stopping))
        await asyncio.sleep(0.5)
        assert not background.done()
    finally:
        await allow(True)
    await asyncio.wait_for(background, 10)
    assert await migrations.check() == "applied"
