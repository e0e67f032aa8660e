"""Health tells the truth: NOT_SERVING while PostgreSQL or the blob store is unusable (or its volume is not
mounted), degraded while the blob volume is short of space, and back by itself."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from mesh.kit import errors
from mesh.kit.runtime import ServiceRuntime
from mesh.services.file.client import FileClient
from mesh.services.file.server import file_service
from mesh.services.file.settings import FileSettings
from tests.file import corpus
from tests.file.conftest import make_settings

pytestmark = pytest.mark.integration

SERVICE = "mesh.file.v1.FileService"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
async def server(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[ServiceRuntime]:
    """A file service of its own (its database and blob dir get broken on purpose)."""
    settings = make_settings(database_url, tmp_path_factory.mktemp("health") / "blobs")
    async with file_service(settings) as runtime:
        task = asyncio.create_task(runtime.run())
        await asyncio.wait_for(runtime.started.wait(), 30)
        yield runtime
        runtime.stopping.set()
        await asyncio.wait_for(task, 15)


async def wait_for_status(runtime: ServiceRuntime, wanted: int, timeout: float) -> float:
    """Poll gRPC health until the service's status is ``wanted``; returns the seconds it took."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE))
            if answer.status == wanted:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(wanted)
                raise AssertionError(f"still {answer.status} after {timeout}s, wanted {name}")
            await asyncio.sleep(0.1)


async def _healthz(runtime: ServiceRuntime) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{runtime.http_port}") as http:
        return await http.get("/healthz")


async def _set_connections(admin_url: str, database: str, *, allowed: bool) -> None:
    """Refuse (and cut) or allow again every connection to ``database``."""
    async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as admin:
        await admin.execute(
            sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS {}").format(
                sql.Identifier(database), sql.Literal(allowed)
            )
        )
        if not allowed:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
            )


def _replace_with_file(directory: Path, aside: Path) -> None:
    """Move the directory aside and put a plain file in its place, so it can be neither used nor made."""
    directory.rename(aside)
    directory.write_bytes(b"a file where the blob directory should be")


def _restore(directory: Path, aside: Path) -> None:
    directory.unlink()
    aside.rename(directory)


async def test_postgres_outage_and_recovery(
    server: ServiceRuntime, database_url: str, postgres_admin_url: str
) -> None:
    """With PostgreSQL refusing connections the service is NOT_SERVING and says why; it recovers alone."""
    await wait_for_status(server, SERVING, 10)
    database = str(conninfo_to_dict(database_url)["dbname"])
    client = FileClient(grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}"))
    try:
        await _set_connections(postgres_admin_url, database, allowed=False)
        try:
            await wait_for_status(server, NOT_SERVING, 15)
            response = await _healthz(server)
            assert response.status_code == 503
            failing = {c["name"] for c in response.json()["checks"] if c["status"] == "failing"}
            assert failing == {"postgresql"}
            with pytest.raises(errors.Unavailable, match="database is unavailable"):
                await client.upload(corpus.png(), filename="during-outage.png")
        finally:
            await _set_connections(postgres_admin_url, database, allowed=True)
        await wait_for_status(server, SERVING, 30)
        assert (await _healthz(server)).status_code == 200
        stored = await client.upload(corpus.png(), filename="after-outage.png")
        assert stored.image.width == 64
    finally:
        await client.close()


def _blob_dir(server: ServiceRuntime) -> Path:
    """The file service's blob directory (the runtime holds its settings as a gRPC server's)."""
    assert isinstance(server.settings, FileSettings)
    return server.settings.blob_dir


async def test_blob_store_outage_and_recovery(server: ServiceRuntime) -> None:
    """With the blob directory unusable the service is NOT_SERVING naming blob_store; it recovers alone."""
    await wait_for_status(server, SERVING, 30)
    blob_dir = _blob_dir(server)
    aside = blob_dir.with_name("blobs.aside")
    await asyncio.to_thread(_replace_with_file, blob_dir, aside)
    try:
        await wait_for_status(server, NOT_SERVING, 10)
        failing = {c["name"] for c in (await _healthz(server)).json()["checks"] if c["status"] == "failing"}
        assert failing == {"blob_store"}
    finally:
        await asyncio.to_thread(_restore, blob_dir, aside)
    await wait_for_status(server, SERVING, 10)


async def test_low_blob_space_degrades_and_keeps_the_service_in_rotation(
    server: ServiceRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A blob volume short of free space is reported (blob_space degraded, naming the space) while the
    service stays SERVING, so readiness keeps it in rotation: downloads and uploads that fit still work.
    It made the whole service NOT_SERVING before."""
    await wait_for_status(server, SERVING, 30)
    blob_dir = _blob_dir(server)
    real_usage = shutil.disk_usage

    def nearly_full(path: Any) -> Any:
        usage = real_usage(path)
        if Path(path) != blob_dir:
            return usage
        return type(usage)(usage.total, usage.total - 20 * 2**20, 20 * 2**20)

    async with FileClient(grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")) as client:
        stored = await client.upload(corpus.noise_png(64, 64, seed=41), filename="before.png")
        monkeypatch.setattr(shutil, "disk_usage", nearly_full)
        await _wait_for_check(server, "blob_space", "degraded", 10)
        checks = {c["name"]: c for c in (await _healthz(server)).json()["checks"]}
        assert checks["blob_space"]["detail"].startswith("OSError: only 20.0 MiB free in ")
        assert checks["blob_store"]["status"] == "ok"
        await wait_for_status(server, SERVING, 1)
        assert (await _healthz(server)).status_code == 200
        assert len((await client.download(str(stored.image.id)))[2]) > 0
        assert (await client.upload(corpus.noise_png(64, 64, seed=42), filename="low.png")).image.width == 64
        monkeypatch.undo()
        await _wait_for_check(server, "blob_space", "ok", 10)


async def test_an_unmounted_blob_volume_is_not_serving_and_the_probe_creates_nothing(
    server: ServiceRuntime,
) -> None:
    """With the blob volume gone (an empty mount point in its place, then no directory at all) the service is
    NOT_SERVING, blob_store naming the directory and a possibly unmounted volume, and the probe does not
    create the directory; with the volume back it serves again. An empty directory was SERVING before."""
    await wait_for_status(server, SERVING, 30)
    blob_dir = _blob_dir(server)
    aside = blob_dir.with_name("blobs.unmounted")
    await asyncio.to_thread(blob_dir.rename, aside)
    try:
        await asyncio.to_thread(blob_dir.mkdir)  # the bare mount point, as left on the root filesystem
        await wait_for_status(server, NOT_SERVING, 10)
        # A probe between the rename and the mkdir saw no directory at all: wait for one that saw the mkdir.
        marker = f"{blob_dir} has no .mesh-blob-store marker; its volume may not be mounted"
        await _wait_for_check(server, "blob_store", "failing", 10, detail=marker)
        checks = {c["name"]: c for c in (await _healthz(server)).json()["checks"]}
        assert {name for name, c in checks.items() if c["status"] == "failing"} == {"blob_store"}
        await asyncio.to_thread(blob_dir.rmdir)
        await _wait_for_check(server, "blob_store", "failing", 10, detail="is not a directory")
        await asyncio.sleep(0.3)  # a few more probes
        assert not await asyncio.to_thread(blob_dir.exists)
        await wait_for_status(server, NOT_SERVING, 1)
    finally:
        if await asyncio.to_thread(blob_dir.is_dir):
            await asyncio.to_thread(blob_dir.rmdir)
        await asyncio.to_thread(aside.rename, blob_dir)
    await wait_for_status(server, SERVING, 10)


async def _wait_for_check(
    runtime: ServiceRuntime, name: str, status: str, timeout: float, *, detail: str = ""
) -> None:
    """Poll /healthz until check ``name`` has ``status`` (and ``detail`` in its detail)."""
    deadline = time.monotonic() + timeout
    while True:
        checks = {c["name"]: c for c in (await _healthz(runtime)).json()["checks"]}
        check = checks.get(name)
        if check is not None and check["status"] == status and detail in check["detail"]:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} still {check} after {timeout}s, wanted {status}")
        await asyncio.sleep(0.1)


async def test_starts_without_postgres_and_migrates_when_it_comes(
    postgres_admin_url: str, empty_database_url: str, tmp_path: Path
) -> None:
    """A service started while its database refuses connections is NOT_SERVING (naming the schema), and
    migrates and turns SERVING by itself once the database answers."""
    url = empty_database_url
    database = str(conninfo_to_dict(url)["dbname"])
    await _set_connections(postgres_admin_url, database, allowed=False)
    try:
        settings = make_settings(url, tmp_path / "blobs", startup_migration_seconds=0.2)
        async with file_service(settings) as runtime:
            task = asyncio.create_task(runtime.run())
            try:
                await asyncio.wait_for(runtime.started.wait(), 30)
                await wait_for_status(runtime, NOT_SERVING, 5)
                checks = {c["name"]: c for c in (await _healthz(runtime)).json()["checks"]}
                assert checks["migrations"]["status"] == "failing"
                assert "not migrated yet" in checks["migrations"]["detail"]
                await _set_connections(postgres_admin_url, database, allowed=True)
                await wait_for_status(runtime, SERVING, 20)
                async with FileClient(grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}")) as client:
                    assert (await client.upload(corpus.png(), filename="late.png")).image.width == 64
            finally:
                runtime.stopping.set()
                await asyncio.wait_for(task, 15)
    finally:
        await _set_connections(postgres_admin_url, database, allowed=True)


async def test_the_api_answers_unavailable_until_the_schema_is_in_place(
    empty_database_url: str, tmp_path: Path
) -> None:
    """While its migrations cannot be applied (a table of the same name is in their way here; in production,
    PostgreSQL came back a moment ago) the service answers UNAVAILABLE saying its schema is not in place,
    not INTERNAL from a query on a missing or foreign table; once they are applied it serves by itself."""
    url = empty_database_url
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE images (id integer)")
    async with file_service(make_settings(url, tmp_path / "blobs")) as runtime:
        task = asyncio.create_task(runtime.run())
        try:
            await asyncio.wait_for(runtime.started.wait(), 30)
            await wait_for_status(runtime, NOT_SERVING, 5)
            checks = {c["name"]: c for c in (await _healthz(runtime)).json()["checks"]}
            assert "DuplicateTable" in checks["migrations"]["detail"]
            async with FileClient(grpc.aio.insecure_channel(f"127.0.0.1:{runtime.grpc_port}")) as client:
                with pytest.raises(errors.Unavailable, match="the file database schema is not in place yet"):
                    await client.list(timeout=5)
                async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
                    await conn.execute("DROP TABLE images")
                await wait_for_status(runtime, SERVING, 20)
                assert list((await client.list(timeout=5)).images) == []
        finally:
            runtime.stopping.set()
            await asyncio.wait_for(task, 15)
