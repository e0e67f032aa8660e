"""The whole mesh as `make up` runs it: one supervisor process per test module."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import psutil
import pytest

from tests.conftest import IN_CI

T = TypeVar("T")


def until(check: Callable[[], T], seconds: float) -> T | None:
    """The first truthy answer of ``check`` within ``seconds`` (asked every quarter second), or None."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        answer = check()
        if answer:
            return answer
        time.sleep(0.25)
    return None


# The system tests run their mesh on moved ports, so they work beside a developer's `make up`.
# The offset keeps every gRPC port (61051-61054) above Linux's ephemeral range (32768-60999), where an
# outgoing connection's local port could collide with a listener.
PORT_OFFSET = 11000
MESH_PORTS = tuple(p + PORT_OFFSET for p in (8080, 50051, 50052, 50053, 50054, 9101, 9102, 9103, 9104))
GATEWAY = f"http://127.0.0.1:{8080 + PORT_OFFSET}"
FILE_GRPC = f"127.0.0.1:{50051 + PORT_OFFSET}"
FILE_METRICS = f"http://127.0.0.1:{9101 + PORT_OFFSET}/metrics/"


@dataclass
class Mesh:
    """A running mesh started by `python -m mesh.tools.up`."""

    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        """The service processes this supervisor started (not those of any other mesh)."""
        try:
            return [p for p in psutil.Process(self.process.pid).children() if _is_service(p)]
        except psutil.NoSuchProcess:
            return []


def _is_service(process: psutil.Process) -> bool:
    try:
        cmdline = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    return len(cmdline) >= 3 and cmdline[1] == "-m" and cmdline[2].startswith("mesh.services.")


def _port_busy(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_mesh(tmp: Path, database_url: str, extra_env: dict[str, str] | None = None) -> Mesh:
    """Start the supervisor and wait until /readyz answers 200 (or fail with its log)."""
    busy = [p for p in MESH_PORTS if _port_busy(p)]
    if busy:
        message = f"ports of the test mesh already in use: {busy}"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    env = {
        **os.environ,
        "MESH_DATABASE_URL": database_url,
        "MESH_BLOB_DIR": str(tmp / "blobs"),
        "MESH_DEVICE": "cpu",
        "MESH_GRACE_SECONDS": "3",
        **(extra_env or {}),
    }
    log_path = tmp / "mesh.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mesh.tools.up", "--grace", "10", "--port-offset", str(PORT_OFFSET)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    mesh = Mesh(process, log_path, env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"make up exited with {process.returncode}:\n{mesh.log()[-5000:]}")
        try:
            if httpx.get(f"{GATEWAY}/readyz", timeout=2).status_code == 200:
                return mesh
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_mesh(mesh)
    pytest.fail(f"the mesh did not become ready within 120 s:\n{mesh.log()[-5000:]}")


def stop_mesh(mesh: Mesh, how: signal.Signals = signal.SIGTERM) -> int:
    """Signal the supervisor (SIGTERM unless told) and wait for it; returns its exit status."""
    if mesh.process.poll() is None:
        mesh.process.send_signal(how)
    try:
        return mesh.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        mesh.process.kill()
        for child in mesh.children():
            child.kill()
        raise


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, database_url: str) -> Iterator[Mesh]:
    """The whole mesh, started once for this module and stopped after it."""
    running = start_mesh(tmp_path_factory.mktemp("mesh"), database_url)
    yield running
    stop_mesh(running)
