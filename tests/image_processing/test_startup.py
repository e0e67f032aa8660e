"""``python -m mesh.services.image_processing`` as a real process: a GPU asked for where there is none stops
the start with one line and exit status 2, before the port opens."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mesh.kit.devices import gpu_available


def test_a_gpu_asked_for_where_there_is_none_stops_the_start_with_one_line() -> None:
    """MESH_DEVICE=gpu without a GPU: exit 2, and the last stderr line names the setting and the way out, with
    no traceback."""
    if gpu_available()[0]:
        pytest.skip("this machine has a GPU")
    env = {**os.environ, "MESH_DEVICE": "gpu", "MESH_GRPC_PORT": "0", "MESH_HTTP_PORT": "0"}
    done = subprocess.run(
        [sys.executable, "-m", "mesh.services.image_processing"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("image-processing: cannot start: MESH_DEVICE=gpu but ")
    assert last.endswith("set MESH_DEVICE=cpu or auto to run on the CPU")
