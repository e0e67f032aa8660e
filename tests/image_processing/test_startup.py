"""``python -m mesh.services.image_processing`` as a real process: a GPU asked for where there is none stops
the start with one line and exit status 2, before the port opens."""

from __future__ import annotations

import os
import socket
import sys

import pytest

from mesh.kit.devices import gpu_available
from tests.processes import reason, refused_start


def test_a_gpu_asked_for_where_there_is_none_stops_the_start_with_one_line() -> None:
    """MESH_DEVICE=gpu without a GPU: exit 2, and the last stderr line names the setting and the way out, with
    no traceback."""
    if gpu_available()[0]:
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "MESH_DEVICE": "gpu", "MESH_GRPC_PORT": "0", "MESH_HTTP_PORT": "0"}
    last = reason(refused_start([sys.executable, "-m", "mesh.services.image_processing"], env))
    assert last.startswith("image-processing: cannot start: MESH_DEVICE=gpu but ")
    assert last.endswith("set MESH_DEVICE=cpu or auto to run on the CPU")


@pytest.mark.parametrize("busy", ["MESH_GRPC_PORT", "MESH_HTTP_PORT"])
def test_a_port_in_use_stops_the_start_with_one_line_and_the_process_exits(
    busy: str, database_url: str, unique_name: str
) -> None:
    """A port another process holds: exit 2 with one line naming it. With its job worker on, the process never
    exited (the worker's PostgreSQL pool, opened by the wiring, was closed only by the worker's run, which a
    failed start never reached); a busy HTTP port left uvicorn's SystemExit (status 3) and a gRPC server never
    stopped."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {
            **os.environ,
            "MESH_DEVICE": "cpu",
            "MESH_JOB_CONCURRENCY": "2",
            "MESH_DATABASE_URL": database_url,
            "MESH_QUEUE_PREFIX": f"{unique_name}.",
            "MESH_GRPC_HOST": "127.0.0.1",
            "MESH_HTTP_HOST": "127.0.0.1",
            "MESH_GRPC_PORT": "0",
            "MESH_HTTP_PORT": "0",
            busy: str(port),
        }
        last = reason(refused_start([sys.executable, "-m", "mesh.services.image_processing"], env))
    kind = "gRPC" if busy == "MESH_GRPC_PORT" else "HTTP"
    assert last.startswith(f"image-processing: cannot start: {kind} port 127.0.0.1:{port} could not be bound")
