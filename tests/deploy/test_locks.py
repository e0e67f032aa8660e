"""requirements.lock pins what the services run on (the images install only it); requirements-dev.lock pins the
tests, linters and tools on top of it."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

from .conftest import REPO

RUNTIME = REPO / "requirements.lock"
DEV = REPO / "requirements-dev.lock"
# Imported only where a GPU is present; the CUDA images pin CuPy in deploy/docker/requirements-cuda.txt.
GPU_ONLY = {"cupy", "cupyx"}
# The image's builder generates the protobuf code (grpcio-tools, mypy-protobuf) and installs the package
# (setuptools) from the runtime lock as well.
BUILD_TOOLS = {"grpcio-tools", "mypy-protobuf", "setuptools"}
# Optional dependencies the services run with, which no module of ours imports by name.
RUNTIME_CHOICES = {
    "httptools": "uvicorn's HTTP parser, in C (h11 otherwise)",
    "psycopg-binary": "psycopg's C implementation with libpq inside (the slim images have no libpq)",
    "python-multipart": "Starlette's parser of multipart/form-data uploads",
}
DEVELOPMENT_TOOLS = {
    "pytest",
    "mypy",
    "ruff",
    "schemathesis",
    "playwright",
    "hypothesis",
    "celery",
    "promql-parser",
}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^=\s]+)$")


def _name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#") or line == "-r requirements.lock":
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: {line!r} is not an exact name==version pin"
        pins[_name(match[1])] = match[2]
    return pins


def _third_party_imports(root: Path) -> set[str]:
    stdlib = sys.stdlib_module_names
    found: set[str] = set()
    for source in root.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.update(
                top for top in (n.split(".")[0] for n in names) if top not in stdlib and top != "mesh"
            )
    return found


def test_every_import_of_the_services_is_pinned_in_the_runtime_lock() -> None:
    """Each third-party module that the kit and the services import comes from a distribution that
    requirements.lock pins, so an image built from it can run every service."""
    runtime = _pins(RUNTIME)
    providers = importlib.metadata.packages_distributions()
    src = REPO / "src" / "mesh"
    modules = _third_party_imports(src / "kit") | _third_party_imports(src / "services")
    assert {"grpc", "numpy", "fastapi"} <= modules
    unpinned = {
        module: providers.get(module)
        for module in modules - GPU_ONLY
        if not any(_name(dist) in runtime for dist in providers.get(module, []))
    }
    assert not unpinned, f"imported by src/mesh but not pinned in requirements.lock: {unpinned}"


def test_the_runtime_lock_holds_no_development_tool_and_the_dev_lock_builds_on_it() -> None:
    """Images stay free of test and lint tools; the dev lock starts from the runtime lock and pins nothing twice."""
    runtime, dev = _pins(RUNTIME), _pins(DEV)
    assert not DEVELOPMENT_TOOLS & runtime.keys()
    assert dev.keys() >= DEVELOPMENT_TOOLS
    assert "-r requirements.lock" in DEV.read_text().splitlines()
    assert not runtime.keys() & dev.keys(), "pinned in both locks"


def test_the_runtime_lock_is_exactly_what_the_services_need() -> None:
    """The runtime lock holds the distributions the services import, what code generation and the package build
    use, and everything those require (by their installed metadata, markers evaluated here), at versions that
    satisfy every requirement; nothing more: a dependency missing from it would be installed unpinned in an
    image, and a pin that nothing needs is dead weight."""
    runtime = _pins(RUNTIME)
    providers = importlib.metadata.packages_distributions()
    src = REPO / "src" / "mesh"
    modules = (_third_party_imports(src / "kit") | _third_party_imports(src / "services")) - GPU_ONLY
    needed = {_name(dist) for module in modules for dist in providers.get(module, [])} | BUILD_TOOLS
    needed |= RUNTIME_CHOICES.keys()
    pending, problems = list(needed), []
    while pending:
        name = pending.pop()
        distribution = importlib.metadata.distribution(name)
        if name not in runtime or distribution.version != runtime[name]:
            problems.append(f"{name} {distribution.version} is needed but pinned as {runtime.get(name)}")
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue  # an extra nobody asked for, or another platform's dependency
            dependency = _name(requirement.name)
            if dependency in runtime and not requirement.specifier.contains(
                runtime[dependency], prereleases=True
            ):
                problems.append(f"{name} requires {requirement}, pinned {runtime[dependency]}")
            if dependency not in needed:
                needed.add(dependency)
                pending.append(dependency)
    assert problems == []
    unneeded = sorted(runtime.keys() - needed)
    assert unneeded == [], f"pinned in requirements.lock but needed by nothing: {unneeded}"
