"""``python -m mesh.services.file`` as a real process: starts, serves health, drains on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.processes import read_started

pytestmark = pytest.mark.integration


async def test_process_serves_and_stops_on_sigterm(database_url: str, tmp_path: Path) -> None:
    """The process starts with settings from MESH_* variables, reports SERVING, and exits 0 on SIGTERM."""
    env = {
        **os.environ,
        "MESH_DATABASE_URL": database_url,
        "MESH_BLOB_DIR": str(tmp_path / "blobs"),
        "MESH_GRPC_HOST": "127.0.0.1",
        "MESH_GRPC_PORT": "0",
        "MESH_HTTP_HOST": "127.0.0.1",
        "MESH_HTTP_PORT": "0",
        "MESH_GRACE_SECONDS": "1",
        "MESH_LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.services.file", env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        started = await asyncio.wait_for(read_started(process), 60)
        assert started["serving"] is True
        async with grpc.aio.insecure_channel(f"127.0.0.1:{started['grpc_port']}") as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="mesh.file.v1.FileService")
            )
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        assert (tmp_path / "blobs").is_dir()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_bad_setting_is_named_at_start() -> None:
    """A malformed MESH_* variable stops the process at once with status 2, naming the variable."""
    env = {**os.environ, "MESH_MAX_UPLOAD_BYTES": "lots"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mesh.services.file", env=env, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 2
    assert "MESH_MAX_UPLOAD_BYTES='lots'" in stderr.decode()
