"""The gateway with API keys starts while PostgreSQL is away: it serves, unready, with key checks answering
503, and migrates its key table in the background instead of exiting after 60 s into a crash loop."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import make_conninfo

from mesh.services.gateway.auth import API_KEY_HEADER
from tests.conftest import free_port

pytestmark = pytest.mark.integration

# Every service on a port where nothing listens, and none required, so that readiness is the gateway's own.
ALONE = {
    **{f"MESH_{name}_SERVICE_ADDRESS": "127.0.0.1:1" for name in ("FILE", "IMAGE", "INFERENCE", "QUEUE")},
    **{f"MESH_{name}_SERVICE_HTTP": "127.0.0.1:1" for name in ("FILE", "IMAGE", "INFERENCE", "QUEUE")},
    "MESH_REQUIRED_SERVICES": "[]",
    "MESH_GRACE_SECONDS": "1",
    "MESH_HEALTH_TIMEOUT_SECONDS": "0.5",
    "MESH_AUTH_MODE": "api_key",
}


@pytest.fixture
def refusing_database(postgres_admin_url: str) -> Iterator[str]:
    """A database of the test's own that refuses connections until ``_allow`` lets them in; dropped after."""
    name = f"mesh_test_gwstart_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {} WITH ALLOW_CONNECTIONS false").format(sql.Identifier(name)))
    yield make_conninfo(postgres_admin_url, dbname=name)
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


async def _allow(admin_url: str, url: str) -> None:
    name = str(psycopg.conninfo.conninfo_to_dict(url)["dbname"])
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin:
        await admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(sql.Identifier(name))
        )


async def test_started_while_postgres_refuses_it_serves_unready_and_checks_keys_once_migrated(
    refusing_database: str, postgres_admin_url: str
) -> None:
    """With its database refusing connections, the gateway answers /healthz within seconds (it waited for the
    migrations for 60 s before, answering nothing, then exited), /readyz is 503 naming the migrations, and a
    request with a key is 503, not a 500 from a missing table; once the database answers, the gateway
    migrates by itself, turns ready, and checks keys (an unknown key is 401)."""
    port = free_port()
    env = {
        **os.environ,
        **ALONE,
        "MESH_DATABASE_URL": refusing_database,
        "MESH_HTTP_PORT": str(port),
        "MESH_HTTP_HOST": "127.0.0.1",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mesh.services.gateway",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            deadline = time.monotonic() + 15
            while True:
                try:
                    assert (await client.get("/healthz")).status_code == 200
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "the gateway did not serve while PostgreSQL was away"
                    await asyncio.sleep(0.1)
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert "migrations" in {c["name"] for c in ready.json()["failing"]}
            keyed = await client.get("/v1/jobs", headers={API_KEY_HEADER: "mesh_unknown"})
            assert keyed.status_code == 503
            assert "the gateway database schema is not in place yet" in keyed.text

            await _allow(postgres_admin_url, refusing_database)
            deadline = time.monotonic() + 30
            while (ready := await client.get("/readyz")).status_code != 200:
                assert time.monotonic() < deadline, f"never ready: {ready.json()}"
                await asyncio.sleep(0.2)
            keyed = await client.get("/v1/jobs", headers={API_KEY_HEADER: "mesh_unknown"})
            assert keyed.status_code == 401
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 20)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
