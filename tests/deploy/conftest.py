"""Fixtures for the deployment tests: rendered overlays and a scratch copy of deploy/k8s."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mesh.tools.k8s_check.render import Manifest, render

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"


@pytest.fixture
def k8s_copy(tmp_path: Path) -> Path:
    """A writable copy of deploy/k8s, for tests that break a manifest on purpose."""
    target = tmp_path / "k8s"
    shutil.copytree(K8S, target)
    return target


@pytest.fixture
def prod_gpu() -> list[Manifest]:
    """The prod-gpu overlay, rendered."""
    return render(K8S / "overlays" / "prod-gpu")


@pytest.fixture
def dev() -> list[Manifest]:
    """The dev overlay, rendered."""
    return render(K8S / "overlays" / "dev")
