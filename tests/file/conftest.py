"""Fixtures of the file service tests: a real file service on PostgreSQL, in this process, on port 0."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh.kit.runtime import ServiceRuntime
from mesh.kit.settings import FileServiceAddress
from mesh.services.file.client import FileClient
from mesh.services.file.server import file_service
from mesh.services.file.settings import FileSettings


def make_settings(database_url: str, blob_dir: Path, **overrides: object) -> FileSettings:
    """Settings for a test server: loopback, ephemeral ports, fast health checks."""
    values: dict[str, object] = {
        "database_url": database_url,
        "blob_dir": blob_dir,
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "http_host": "127.0.0.1",
        "http_port": 0,
        "health_interval_seconds": 0.1,
        "health_timeout_seconds": 1.0,
        "grace_seconds": 1.0,
        **overrides,
    }
    return FileSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def blob_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This module's blob store root."""
    return tmp_path_factory.mktemp("blobs")


@pytest.fixture(scope="module")
async def file_server(database_url: str, blob_dir: Path) -> AsyncIterator[ServiceRuntime]:
    """A running file service (migrated database, own blob dir), stopped after the module."""
    settings = make_settings(database_url, blob_dir)
    async with file_service(settings) as runtime:
        task = asyncio.create_task(runtime.run())
        await asyncio.wait_for(runtime.started.wait(), 30)
        yield runtime
        runtime.stopping.set()
        await asyncio.wait_for(task, 15)


@pytest.fixture(scope="module")
async def file_client(file_server: ServiceRuntime) -> AsyncIterator[FileClient]:
    """A client of ``file_server`` on a kit channel."""
    client = FileClient.connect(FileServiceAddress(file_service_address=f"127.0.0.1:{file_server.grpc_port}"))
    yield client
    await client.close()
