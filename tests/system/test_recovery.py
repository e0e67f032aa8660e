"""Health tells the truth about PostgreSQL and recovers by itself, without restarting anything."""

from __future__ import annotations

import io
import time
from collections.abc import Callable

import grpc
import httpx
import psycopg
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tests.system.conftest import FILE_GRPC, GATEWAY, Mesh


def _file_service_status() -> int:
    with grpc.insecure_channel(FILE_GRPC) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="mesh.file.v1.FileService"), timeout=5
        )
    return int(response.status)


def _until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.25)
    return False


def test_database_outage_is_reported_and_recovers(mesh: Mesh, postgres_admin_url: str) -> None:
    """With the mesh's database refusing connections, /readyz is 503 naming PostgreSQL and the file
    service is NOT_SERVING; once connections are allowed again both recover without a restart."""
    database = str(conninfo_to_dict(mesh.env["MESH_DATABASE_URL"])["dbname"])
    name = sql.Identifier(database)
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS false").format(name))
        try:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (database,)
            )
            assert _until(lambda: httpx.get(f"{GATEWAY}/readyz", timeout=5).status_code == 503, 20)
            body = httpx.get(f"{GATEWAY}/readyz", timeout=5).text.lower()
            assert "postgres" in body, body
            assert _until(lambda: _file_service_status() == health_pb2.HealthCheckResponse.NOT_SERVING, 20)
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(name))
    assert _until(lambda: _file_service_status() == health_pb2.HealthCheckResponse.SERVING, 30)
    assert _until(lambda: httpx.get(f"{GATEWAY}/readyz", timeout=5).status_code == 200, 30)
    assert httpx.get(f"{GATEWAY}/v1/images", timeout=5).status_code == 200


def _png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_acceptance_errors_through_the_gateway(mesh: Mesh) -> None:
    """As a new user sees it: text named .png -> 415, truncated PNG -> 400 saying so, 30 MiB -> 413."""
    png = _png_bytes()
    text = httpx.post(
        f"{GATEWAY}/v1/images", files={"file": ("a.png", b"hello world\n", "image/png")}, timeout=10
    )
    assert text.status_code == 415, text.text
    cut = httpx.post(
        f"{GATEWAY}/v1/images", files={"file": ("b.png", png[: len(png) // 2], "image/png")}, timeout=10
    )
    assert cut.status_code == 400, cut.text
    assert "truncated" in cut.json()["error"]["message"]
    big = httpx.post(
        f"{GATEWAY}/v1/images",
        files={"file": ("c.png", png + b"\0" * (30 * 1024 * 1024), "image/png")},
        timeout=30,
    )
    assert big.status_code == 413, big.text
    assert big.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
