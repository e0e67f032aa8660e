"""Health tells the truth about PostgreSQL and recovers by itself, without restarting anything; what a new
user sees of bad input, across the real services."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tests.system.conftest import FILE_GRPC, GATEWAY, PORT_OFFSET, Mesh, until

# Each runs the whole mesh on the same moved ports: `make test` runs them after its parallel run, one after another.
pytestmark = pytest.mark.serial


def _file_service_status() -> int:
    with grpc.insecure_channel(FILE_GRPC) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="mesh.file.v1.FileService"), timeout=5
        )
    return int(response.status)


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
            assert until(lambda: httpx.get(f"{GATEWAY}/readyz", timeout=5).status_code == 503, 20)
            body = httpx.get(f"{GATEWAY}/readyz", timeout=5).text.lower()
            assert "postgres" in body, body
            assert until(lambda: _file_service_status() == health_pb2.HealthCheckResponse.NOT_SERVING, 20)
        finally:
            admin.execute(sql.SQL("ALTER DATABASE {} WITH ALLOW_CONNECTIONS true").format(name))
    assert until(lambda: _file_service_status() == health_pb2.HealthCheckResponse.SERVING, 30)
    assert until(lambda: httpx.get(f"{GATEWAY}/readyz", timeout=5).status_code == 200, 30)
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


def test_a_job_that_could_never_run_is_refused_at_submit(mesh: Mesh) -> None:
    """Through the gateway, with the queue asking the real file and inference services: an unknown filter is
    400, an image or a model that does not exist 404 naming it, and a good job is still 202."""
    image = httpx.post(
        f"{GATEWAY}/v1/images", files={"file": ("a.png", _png_bytes(), "image/png")}, timeout=10
    )
    image_id = image.json()["id"]

    def submit(body: dict[str, object]) -> httpx.Response:
        return httpx.post(f"{GATEWAY}/v1/jobs", json=body, timeout=10)

    bad_filter = submit({"image_id": image_id, "pipeline": [{"filter": "blurr"}]})
    assert bad_filter.status_code == 400, bad_filter.text
    assert "unknown filter 'blurr'" in bad_filter.json()["error"]["message"]
    no_image = submit({"image_id": "00000000-0000-4000-8000-000000000000", "model": "strip-reader"})
    assert no_image.status_code == 404, no_image.text
    assert "image 00000000-0000-4000-8000-000000000000 does not exist" in no_image.json()["error"]["message"]
    no_model = submit({"image_id": image_id, "model": "strip-raeder"})
    assert no_model.status_code == 404, no_model.text
    assert "model 'strip-raeder' does not exist" in no_model.json()["error"]["message"]
    no_version = submit({"image_id": image_id, "model": "strip-reader/9"})
    assert no_version.status_code == 404, no_version.text
    assert "model 'strip-reader' has no version '9'" in no_version.json()["error"]["message"]
    not_a_reference = submit({"image_id": image_id, "model": "strip-reader/"})
    assert not_a_reference.status_code == 400, not_a_reference.text
    good = submit({"image_id": image_id, "pipeline": [{"filter": "grayscale"}], "model": "strip-reader"})
    assert good.status_code == 202, good.text


def test_a_job_can_pin_a_model_version(mesh: Mesh) -> None:
    """``model: name/version`` is accepted at submit and read by that version, with a pipeline (the image
    service's worker runs the model) and without (the inference service's)."""
    image = httpx.post(
        f"{GATEWAY}/v1/images", files={"file": ("a.png", _png_bytes(), "image/png")}, timeout=10
    )
    image_id = image.json()["id"]
    bodies = [
        {"image_id": image_id, "model": "strip-reader/1"},
        {"image_id": image_id, "pipeline": [{"filter": "grayscale"}], "model": "strip-reader/1"},
    ]
    for body in bodies:
        submitted = httpx.post(f"{GATEWAY}/v1/jobs", json=body, timeout=10)
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        deadline = time.monotonic() + 30
        while (
            job["state"] not in ("SUCCEEDED", "FAILED", "DEAD", "CANCELLED") and time.monotonic() < deadline
        ):
            time.sleep(0.2)
            job = httpx.get(f"{GATEWAY}/v1/jobs/{job['id']}", timeout=10).json()
        assert job["state"] == "SUCCEEDED", job
        prediction = job["result"]["prediction"]
        assert (prediction["model_name"], prediction["model_version"]) == ("strip-reader", "1")


def test_the_load_tool_seeds_the_same_mesh_twice(mesh: Mesh, tmp_path: Path) -> None:
    """``make load`` seeds a new image and a job under a key each run; a second run against the same database
    must not reuse the first run's key for another image (it did: 409 and no load test)."""
    addresses = {
        f"MESH_{name}_SERVICE_ADDRESS": f"127.0.0.1:{port + PORT_OFFSET}"
        for name, port in (("FILE", 50051), ("IMAGE", 50052), ("INFERENCE", 50053), ("QUEUE", 50054))
    }
    for run in range(2):
        seeded = subprocess.run(
            [sys.executable, "-m", "mesh.tools.load", "--write-payloads", "--payload-dir", str(tmp_path)],
            env={**mesh.env, **addresses},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert seeded.returncode == 0, f"run {run}: {seeded.stderr}"
