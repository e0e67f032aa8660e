"""``python -m mesh.services.inference`` as a real process: a model repository it cannot read, or a GPU asked
for where there is none, stops the start with one line and exit status 2, before any model loads."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from mesh.kit.devices import gpu_available
from tests.processes import reason, refused_start


def _refused(**variables: str) -> str:
    """The one line with which the inference process, started with ``variables``, refused to start."""
    env = {**os.environ, "MESH_GRPC_PORT": "0", "MESH_HTTP_PORT": "0", **variables}
    return reason(refused_start([sys.executable, "-m", "mesh.services.inference"], env))


def test_a_model_directory_that_is_not_there_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """MESH_MODEL_DIR naming no directory: exit 2, and the last stderr line names the problem and the setting,
    with no traceback."""
    last = _refused(MESH_MODEL_DIR=str(tmp_path / "absent"), MESH_DEVICE="cpu")
    assert last.startswith("inference: cannot start: ")
    assert last.endswith("is not a directory (set MESH_MODEL_DIR)")


def test_a_gpu_asked_for_where_there_is_none_stops_the_start_with_one_line(tmp_path: Path) -> None:
    """MESH_DEVICE=gpu without a GPU: exit 2, and the last stderr line names the setting and the way out."""
    if gpu_available()[0]:
        pytest.skip("this machine has a GPU")
    last = _refused(MESH_MODEL_DIR=str(tmp_path), MESH_DEVICE="gpu")
    assert last.startswith("inference: cannot start: MESH_DEVICE=gpu but ")
    assert last.endswith("set MESH_DEVICE=cpu or auto to run on the CPU")
