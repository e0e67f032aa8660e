"""`make up` as a new user runs it: the mesh starts, answers, and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import grpc
import httpx
import numpy as np
import psutil
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from mesh.tools import up
from mesh.tools.up import PROCESSES, STOP_ORDER, child_environment, stop_all
from tests.system.conftest import FILE_GRPC, GATEWAY, start_mesh, stop_mesh

# Each runs the whole mesh on the same moved ports: `make test` runs them after its parallel run, one after another.
pytestmark = pytest.mark.serial


def _png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 180, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def _noisy_png(width: int, height: int) -> bytes:
    """A PNG of random pixels: about 3 bytes a pixel, so its upload spans many HTTP chunks."""
    pixels = np.random.default_rng(5).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def test_up_serves_and_sigterm_stops_every_process(tmp_path: Path, database_url: str) -> None:
    """The supervisor brings the mesh to ready, uploads (multipart, and a raw body in pieces) work end to end,
    and SIGTERM stops every child."""
    mesh = start_mesh(tmp_path, database_url)
    try:
        children = mesh.children()
        assert children, "no service processes found"
        response = httpx.post(
            f"{GATEWAY}/v1/images", files={"file": ("a.png", _png(), "image/png")}, timeout=10
        )
        assert response.status_code == 201, response.text
        again = httpx.post(f"{GATEWAY}/v1/images", files={"file": ("b.png", _png(), "image/png")}, timeout=10)
        assert again.json()["sha256"] == response.json()["sha256"]
        blobs = [
            p for p in (tmp_path / "blobs").rglob("*") if p.is_file() and p.name == response.json()["sha256"]
        ]
        assert len(blobs) == 1, "the same bytes must be stored once"
        # A raw body sent in pieces is streamed through the gateway to the file service and stored whole.
        photo = _noisy_png(700, 600)
        pieces = (photo[start : start + 100_000] for start in range(0, len(photo), 100_000))
        raw = httpx.post(
            f"{GATEWAY}/v1/images?filename=raw.png",
            content=pieces,
            headers={"content-type": "image/png"},
            timeout=10,
        )
        assert raw.status_code == 201, raw.text
        stored = httpx.get(f"{GATEWAY}/v1/images/{raw.json()['id']}/content", timeout=10)
        assert stored.content == photo
        with grpc.insecure_channel(FILE_GRPC) as channel:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="mesh.file.v1.FileService"), timeout=5
            )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        code = stop_mesh(mesh)
    assert code == 0, mesh.log()[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children
    ):
        time.sleep(0.2)
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert "stopped" in mesh.log()


def test_a_closed_terminal_stops_every_process(tmp_path: Path, database_url: str) -> None:
    """SIGHUP (the terminal closed, the SSH session dropped) stops the mesh as Ctrl-C does: it killed only the
    supervisor, and the services, each in a session of its own, ran on holding the ports."""
    mesh = start_mesh(tmp_path, database_url)
    children = mesh.children()
    assert children, "no service processes found"
    assert stop_mesh(mesh, signal.SIGHUP) == 0, mesh.log()[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children
    ):
        time.sleep(0.2)
    assert not [c.pid for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_a_supervisor_killed_outright_takes_its_services_with_it(tmp_path: Path, database_url: str) -> None:
    """SIGKILL (or the OOM killer) gives the supervisor no chance to stop anything: the kernel's parent-death
    signal stops each service instead, where they ran on holding the ports."""
    mesh = start_mesh(tmp_path, database_url)
    children = [c for c in mesh.children() if c.ppid() == mesh.process.pid]
    assert len(children) == 5, [c.cmdline() for c in children]
    mesh.process.kill()
    mesh.process.wait(timeout=10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children
    ):
        time.sleep(0.2)
    running = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    for child in running:
        child.kill()
    assert not running, [c.cmdline() for c in running]


def _up_refusing(blob_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`make up` run where it should refuse to start, with its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "mesh.tools.up", *args],
        env={**os.environ, "MESH_BLOB_DIR": str(blob_dir), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_up_names_an_unreachable_dependency_and_how_to_start_it(tmp_path: Path) -> None:
    """With PostgreSQL or RabbitMQ unreachable, `make up` exits 1 naming it and how to start it."""
    cases = {
        "PostgreSQL": {"MESH_DATABASE_URL": "postgresql://127.0.0.1:1/mesh"},
        "RabbitMQ": {"MESH_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"},
    }
    for name, env in cases.items():
        result = _up_refusing(tmp_path, env)
        assert result.returncode == 1
        assert f"{name} is not reachable" in result.stdout
        assert "start it with" in result.stdout


def test_up_names_a_port_already_in_use_before_starting_anything(tmp_path: Path, database_url: str) -> None:
    """A port the mesh needs that something else holds is named, with what to do, and nothing starts: the
    gateway used to fail to bind, and its reason was one JSON log line among the others' while the mesh
    stopped ("gateway exited with status 3")."""
    offset = 3100
    with socket.create_server(("127.0.0.1", 8080 + offset)):
        result = _up_refusing(tmp_path, {"MESH_DATABASE_URL": database_url}, "--port-offset", str(offset))
    assert result.returncode == 1
    assert f"already in use on this machine: port {8080 + offset} (gateway HTTP)" in result.stdout
    # The command to paste names this interpreter: a bare `python` is not the project's until .venv is active.
    assert "bin/python -m mesh.tools.up --port-offset 1000" in result.stdout
    assert "started" not in result.stdout


def test_up_says_once_that_it_created_the_database(
    tmp_path: Path, empty_database_url: str, postgres_admin_url: str
) -> None:
    """A first `make up` creates the mesh's database and says so in one of its own lines; the kit's log line
    for it (in another format, ahead of everything else) no longer repeats it."""
    name = str(conninfo_to_dict(empty_database_url)["dbname"])
    with psycopg.connect(postgres_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
    offset = 3200
    with socket.create_server(("127.0.0.1", 8080 + offset)):  # so that it stops right after the database
        result = _up_refusing(
            tmp_path, {"MESH_DATABASE_URL": empty_database_url}, "--port-offset", str(offset)
        )
    assert result.returncode == 1
    assert f"[mesh] created database {name}" in result.stdout
    assert "database created" not in result.stdout + result.stderr


def test_on_a_terminal_the_processes_log_for_people_unless_told_otherwise() -> None:
    """`make up` in a terminal gives its processes console logs (JSON lines from five processes are hard to
    read there); piped, or with MESH_LOG_FORMAT set, the environment is left as it was."""
    assert child_environment({"PATH": "/bin"}, terminal=True) == {
        "PATH": "/bin",
        "PYTHONUNBUFFERED": "1",
        "MESH_SUPERVISOR_PID": str(os.getpid()),
        "MESH_LOG_FORMAT": "console",
    }
    assert "MESH_LOG_FORMAT" not in child_environment({"PATH": "/bin"}, terminal=False)
    chosen = child_environment({"MESH_LOG_FORMAT": "json"}, terminal=True)
    assert chosen["MESH_LOG_FORMAT"] == "json"


def test_up_names_a_refused_rabbitmq_login_and_what_to_fix(tmp_path: Path, amqp_url: str) -> None:
    """A wrong RabbitMQ password or a missing vhost stops `make up` before anything starts, saying which and
    what to fix: a TCP check passed both, every process then reported healthy, and no job ever ran."""
    parts = urlsplit(amqp_url)
    wrong_password = parts._replace(
        netloc=f"{parts.username or 'guest'}:not-the-password@{parts.hostname}:{parts.port or 5672}"
    )
    missing_vhost = parts._replace(path="/mesh-no-such-vhost")
    cases = {
        urlunsplit(wrong_password): "ACCESS_REFUSED",
        urlunsplit(missing_vhost): "virtual host 'mesh-no-such-vhost'",
    }
    for url, said in cases.items():
        # Moved ports: were the login not checked, this mesh would start (and time out) beside any other.
        result = _up_refusing(tmp_path, {"MESH_AMQP_URL": url}, "--port-offset", "3200")
        assert result.returncode == 1, result.stdout + result.stderr
        assert said in result.stdout, result.stdout
        assert "-> fix the user, password or virtual host in MESH_AMQP_URL" in result.stdout
        assert "started" not in result.stdout


def test_the_stop_order_names_every_process() -> None:
    """Every process of the mesh has its place in the stop order (stop_all sorts the children by it)."""
    assert sorted(STOP_ORDER) == sorted(p.name for p in PROCESSES)


async def test_processes_stop_one_after_the_other_callers_first(tmp_path: Path) -> None:
    """Each process gets SIGTERM only once the one before it in the stop order has exited (the gateway
    first, the file service last): stopped all at once, the file service was gone before the workers'
    running jobs could store their results."""
    record = tmp_path / "record"
    # A child that notes when SIGTERM reached it and when it exits, after a drain of 0.3 s.
    program = (
        "import signal, sys, time\n"
        "def drain(*_):\n"
        "    with open(sys.argv[1], 'a') as f: f.write(f'{sys.argv[2]} term {time.monotonic()}\\n')\n"
        "    time.sleep(0.3)\n"
        "    with open(sys.argv[1], 'a') as f: f.write(f'{sys.argv[2]} exit {time.monotonic()}\\n')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, drain)\n"
        "print('ready', flush=True)\n"
        "while True: time.sleep(1)\n"
    )
    children = {}
    for name in reversed(STOP_ORDER):
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", program, str(record), name, stdout=asyncio.subprocess.PIPE
        )
        assert child.stdout is not None
        assert await child.stdout.readline() == b"ready\n"
        children[name] = child
    await stop_all(children, grace=20)
    assert all(c.returncode == 0 for c in children.values())
    events = [line.split() for line in record.read_text().splitlines()]
    assert [(name, what) for name, what, _ in events] == [
        (name, what) for name in STOP_ORDER for what in ("term", "exit")
    ]
    times = [float(at) for _, _, at in events]
    assert times == sorted(times)


def _blurry_photo() -> bytes:
    rng = np.random.default_rng(7)
    pixels = (rng.random((120, 320, 3)) * 40 + 200).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_ctrl_c_lets_running_jobs_store_their_results(tmp_path: Path, database_url: str) -> None:
    """Ctrl-C while a job runs: the job finishes in its worker's drain, stores its output in the file service
    and asks the inference service for its model, and ends SUCCEEDED. With every process stopped at once the
    file service was gone first, and the attempt ended RETRY_WAIT (TRANSIENT, UNAVAILABLE)."""
    # A drain long enough for the job below on a slow machine; the supervisor's grace still covers it.
    mesh = start_mesh(tmp_path, database_url, {"MESH_GRACE_SECONDS": "8"})
    try:
        with httpx.Client(base_url=GATEWAY, timeout=15) as client:
            upload = client.post("/v1/images", files={"file": ("s.png", _blurry_photo(), "image/png")})
            assert upload.status_code == 201, upload.text
            # About 2 s of compute on one core (enough to be seen RUNNING, short enough for the drain on a
            # slower machine), then a model: at its end the job calls the file and the inference service.
            pipeline = [
                {"filter": "resize", "params": {"width": 4000, "height": 1500}},
                *[{"filter": "gaussian_blur", "params": {"sigma": 20}}] * 4,
                {"filter": "resize", "params": {"width": 320, "height": 120}},
            ]
            body = {"image_id": upload.json()["id"], "pipeline": pipeline, "model": "strip-reader"}
            submitted = client.post("/v1/jobs", json=body)
            assert submitted.status_code == 202, submitted.text
            job_id = submitted.json()["id"]
            deadline = time.monotonic() + 30
            while (state := client.get(f"/v1/jobs/{job_id}").json()["state"]) != "RUNNING":
                assert state == "QUEUED", state
                assert time.monotonic() < deadline, "the job did not start within 30 s"
                time.sleep(0.05)
    finally:
        code = stop_mesh(mesh, signal.SIGINT)
    assert code == 0, mesh.log()[-3000:]
    with psycopg.connect(database_url) as conn:
        state = conn.execute("SELECT state FROM jobs WHERE id = %s", (job_id,)).fetchone()
        history = conn.execute(
            "SELECT to_state, reason FROM job_history WHERE job_id = %s ORDER BY id", (job_id,)
        ).fetchall()
    assert state == ("SUCCEEDED",), (history, mesh.log()[-5000:])


def test_the_postgresql_check_tells_a_refused_login_from_a_server_that_is_down(database_url: str) -> None:
    """A server that refuses the user (here an unknown role) is named as refusing, with how to fix the URL, not
    as "not reachable" with the advice to start it; a database that does not exist yet passes (each service
    creates its own); a closed port is not reachable."""
    refused = up.check_postgres(make_conninfo(database_url, user="no_such_role_for_mesh", password="x"))
    assert refused is not None
    assert refused[0].startswith("PostgreSQL refused the connection (")
    assert "no_such_role_for_mesh" in refused[0]
    assert refused[1] == up.HOW_TO_LOG_IN_PG
    assert up.check_postgres(make_conninfo(database_url, dbname="mesh_not_created_yet")) is None
    down = up.check_postgres("postgresql://127.0.0.1:1/mesh")
    assert down is not None
    assert down[0].startswith("PostgreSQL is not reachable")
