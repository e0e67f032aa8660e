"""The queue service starts without its schema: started while PostgreSQL is away (or its migrations cannot be
applied yet), it serves unready instead of exiting, refuses its API and holds its loops back until the
migrations are in, and then serves by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mesh.kit.runtime import LIVENESS_SERVICE, ServiceRuntime
from mesh.queue.v1 import job_pb2, queue_service_pb2, queue_service_pb2_grpc
from mesh.services.queue.app import QueueApp
from mesh.services.queue.settings import SERVICE_NAME, QueueSettings
from tests.queue.harness import IMAGE_ID, delete_queues, fast_settings

pytestmark = pytest.mark.integration

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# What the loops that use the tables log when a round fails.
LOOP_FAILURES = {
    "reconciler sweep failed",
    "outbox round failed",
    "queue gauges not refreshed",
    "dead letter not recorded; will retry",
}


@pytest.fixture
def own_database(postgres_admin_url: str) -> Iterator[str]:
    """A database of the test's own, dropped after (its connections get refused on purpose)."""
    name = f"mesh_test_qstart_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield make_conninfo(postgres_admin_url, dbname=name)
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def _allow_connections(admin_url: str, url: str, allowed: bool) -> None:
    database = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin:
        await admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database), sql.Literal(allowed)
            )
        )


@contextlib.asynccontextmanager
async def serving(settings: QueueSettings) -> AsyncIterator[tuple[ServiceRuntime, grpc.aio.Channel]]:
    """The queue service as ``python -m mesh.services.queue`` runs it, its first migration attempt cut short,
    and a channel to it."""
    app = QueueApp(settings)
    await asyncio.wait_for(app.start(migration_seconds=0.2), 10)  # it waited 60 s, then raised
    runtime = app.runtime()
    app.install(runtime)
    task = asyncio.create_task(runtime.run())
    try:
        await asyncio.wait_for(runtime.started.wait(), 20)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
            yield runtime, channel
    finally:
        runtime.stopping.set()
        await asyncio.wait_for(task, 30)
        await app.close()
        await delete_queues(settings.amqp_url, app.servicer.queues)


async def _status(channel: grpc.aio.Channel, name: str) -> int:
    answer = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=name), timeout=5
    )
    return int(answer.status)


async def _wait_for_status(channel: grpc.aio.Channel, wanted: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (status := await _status(channel, SERVICE_NAME)) != wanted:
        assert time.monotonic() < deadline, f"still {status} after {timeout}s"
        await asyncio.sleep(0.1)


async def _migrations_check(runtime: ServiceRuntime) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.http_port}") as http:
        checks = {c["name"]: c for c in (await http.get("/healthz")).json()["checks"]}
    return dict(checks["migrations"])


async def _submit(channel: grpc.aio.Channel) -> job_pb2.Job:
    stub = queue_service_pb2_grpc.QueueServiceStub(channel)
    request = queue_service_pb2.SubmitJobRequest(image_id=IMAGE_ID, model="script:noop")
    return (await stub.SubmitJob(request, timeout=5)).job


async def _outbox(url: str) -> int:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        found = await (await conn.execute("SELECT count(*) FROM outbox")).fetchone()
    assert found is not None
    return int(found[0])


async def test_started_while_postgres_refuses_it_serves_unready_and_migrates_once_postgres_answers(
    own_database: str, postgres_admin_url: str, amqp_url: str, unique_name: str
) -> None:
    """Started while its database refuses connections, the service serves at once (liveness SERVING, its own
    name NOT_SERVING, the migrations check saying why) instead of exiting after 60 s into a crash loop; once
    the database answers it migrates in the background, turns SERVING and accepts jobs."""
    await _allow_connections(postgres_admin_url, own_database, False)
    try:
        async with serving(fast_settings(own_database, amqp_url, unique_name)) as (runtime, channel):
            assert await _status(channel, LIVENESS_SERVICE) == SERVING
            await _wait_for_status(channel, NOT_SERVING, 5)
            check = await _migrations_check(runtime)
            assert check["status"] == "failing"
            assert "not migrated yet" in check["detail"]
            await _allow_connections(postgres_admin_url, own_database, True)
            await _wait_for_status(channel, SERVING, 30)
            assert (await _submit(channel)).state == job_pb2.JOB_STATE_QUEUED
    finally:
        await _allow_connections(postgres_admin_url, own_database, True)


async def test_the_api_and_the_loops_wait_for_the_schema(
    own_database: str, amqp_url: str, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While the migrations cannot be applied (a table of the same name is in their way here; in production,
    PostgreSQL came back a moment ago), a submit answers UNAVAILABLE saying the schema is not in place, and the
    relay, reconciler, dead-letter consumer and gauges touch no table (none logs a failed round); once the
    migrations are in, a submit is accepted and the relay publishes it."""
    async with await psycopg.AsyncConnection.connect(own_database, autocommit=True) as conn:
        await conn.execute("CREATE TABLE jobs (id integer)")
    # The relay in this process, so that its log lines are seen.
    settings = fast_settings(own_database, amqp_url, unique_name, relay_process=False)
    with caplog.at_level(logging.WARNING, logger="mesh.services.queue"):
        async with serving(settings) as (runtime, channel):
            await _wait_for_status(channel, NOT_SERVING, 5)
            assert "DuplicateTable" in (await _migrations_check(runtime))["detail"]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _submit(channel)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert refused.value.details() == "the queue database schema is not in place yet; retry shortly"
            await asyncio.sleep(1.0)  # rounds of every loop (0.1 to 0.5 s apart), had they run
            failed = [
                r.msg["event"]
                for r in caplog.records
                if isinstance(r.msg, dict) and r.msg.get("event") in LOOP_FAILURES
            ]
            assert failed == []
            async with await psycopg.AsyncConnection.connect(own_database, autocommit=True) as conn:
                await conn.execute("DROP TABLE jobs")
            await _wait_for_status(channel, SERVING, 30)
            assert (await _submit(channel)).state == job_pb2.JOB_STATE_QUEUED
            deadline = time.monotonic() + 20
            while await _outbox(own_database):
                assert time.monotonic() < deadline, "the relay never published the job"
                await asyncio.sleep(0.1)
