"""Static checks of deploy/docker/Dockerfile: pinned bases, non-root targets, the shared lock, CUDA variant."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.tools.k8s_check import dockerfile

from .conftest import REPO

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
CUDA_REQUIREMENTS = REPO / "deploy" / "docker" / "requirements-cuda.txt"


def _broken(tmp_path: Path, old: str, new: str) -> list[str]:
    text = DOCKERFILE.read_text()
    assert old in text, old
    path = tmp_path / "Dockerfile"
    path.write_text(text.replace(old, new, 1))
    return [str(v) for v in dockerfile.check(path)]


def test_committed_dockerfile_passes() -> None:
    """The committed Dockerfile and CUDA pins meet every image policy."""
    assert dockerfile.check(DOCKERFILE, CUDA_REQUIREMENTS) == []


def test_every_service_has_a_target_with_its_module() -> None:
    """Each service (and each CUDA variant) is a build target that runs its own module."""
    stages = {s.name: s for s in dockerfile.parse(DOCKERFILE.read_text())}
    for target, module in dockerfile.SERVICE_TARGETS.items():
        assert any(k == "CMD" and module in v for k, v in stages[target].instructions), target


def test_arg_defaults_resolve_in_from() -> None:
    """FROM ${PYTHON_IMAGE} resolves to the ARG default, so the pin that is checked is the one built."""
    stages = {s.name: s for s in dockerfile.parse(DOCKERFILE.read_text())}
    assert stages["builder"].base.startswith("python:3.11.")
    assert stages["runtime-cuda"].base.startswith("nvidia/cuda:12.")


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("python:3.11.14-slim-bookworm", "python:latest", "is not pinned"),
        ("python:3.11.14-slim-bookworm", "python:slim", "is not pinned"),
        (
            "USER 10001:10001\n\n# runtime-cuda",
            "USER root\n\n# runtime-cuda",
            "target file: must end as a non-root USER",
        ),
        ("COPY requirements.lock ./", "COPY requirements.txt ./", "does not COPY requirements.lock"),
        ("RUN python scripts/gen_protos.py", "RUN true", "does not run scripts/gen_protos.py"),
        (
            'CMD ["python", "-m", "mesh.services.queue"]',
            'CMD ["python", "-m", "mesh.services.file"]',
            "target queue: must run",
        ),
    ],
)
def test_broken_dockerfile_is_caught(tmp_path: Path, old: str, new: str, expected: str) -> None:
    """Unpinned or latest bases, a root user, a different lock, no codegen and a wrong entry point are reported."""
    assert any(expected in m for m in _broken(tmp_path, old, new))


def test_unpinned_cupy_is_caught(tmp_path: Path) -> None:
    """CuPy in the CUDA images must be pinned to an exact version."""
    requirements = tmp_path / "requirements-cuda.txt"
    requirements.write_text("cupy-cuda12x>=13\n")
    assert any("cupy-cuda12x must be pinned" in str(v) for v in dockerfile.check(DOCKERFILE, requirements))


def test_loose_cuda_requirement_is_caught(tmp_path: Path) -> None:
    """Every CUDA-only requirement is an exact pin: CuPy 14's own dependency cuda-pathfinder, left to a range,
    came in at whatever version was newest when the image was built."""
    requirements = tmp_path / "requirements-cuda.txt"
    requirements.write_text("cupy-cuda12x==14.2.0\ncuda-pathfinder>=1.3.4\n")
    assert [str(v) for v in dockerfile.check(DOCKERFILE, requirements)] == [
        f"{requirements}: cuda-pathfinder>=1.3.4 is not an exact pin (name==version)"
    ]
    assert "cuda-pathfinder==" in CUDA_REQUIREMENTS.read_text(), "the committed file pins it"
