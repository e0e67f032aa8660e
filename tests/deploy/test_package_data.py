"""The mesh's wheel, built as the Dockerfile's ``pip install .`` builds it, carries the files the services read
and the licences of the code it vendors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import REPO

GATEWAY_STATIC = Path("src/mesh/services/gateway/static")


def test_wheel_ships_every_gateway_static_file_with_swagger_ui_licence(tmp_path: Path) -> None:
    """Every file under the gateway's static/ goes into the wheel, the vendored swagger-ui's LICENSE, NOTICE
    and VERSION included (files without an extension, which the package-data globs used to miss, so the
    images shipped the bundle without the notice Apache-2.0 requires)."""
    tree = tmp_path / "tree"
    # A copy, so the build's build/ and egg-info never land in the working tree.
    shutil.copytree(
        REPO / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    )
    shutil.copy(REPO / "pyproject.toml", tree / "pyproject.toml")
    out = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_wheel({str(out)!r})"],
        cwd=tree,
        check=True,
        capture_output=True,
        timeout=120,
    )
    (wheel,) = out.glob("mesh-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        shipped = set(archive.namelist())

    static = REPO / GATEWAY_STATIC
    expected = {
        path.relative_to(REPO / "src").as_posix()
        for path in static.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    licence = {f"mesh/services/gateway/static/vendor/swagger-ui/{name}" for name in ("LICENSE", "NOTICE")}
    assert licence <= expected, "the vendored swagger-ui lost its licence files"
    assert sorted(expected - shipped) == []
