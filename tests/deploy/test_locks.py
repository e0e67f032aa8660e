"""requirements.lock pins what the services run on (the images install only it); requirements-dev.lock pins the
tests, linters and tools on top of it."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

from .conftest import REPO

RUNTIME = REPO / "requirements.lock"
DEV = REPO / "requirements-dev.lock"
# Imported only where a GPU is present; the CUDA images pin CuPy in deploy/docker/requirements-cuda.txt.
GPU_ONLY = {"cupy", "cupyx"}
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


def test_the_runtime_lock_is_complete(tmp_path: Path) -> None:
    """pip resolves requirements.lock alone to exactly its own pins: no dependency of a pinned package is
    missing (an image would install an unpinned version of it) and none is pinned for nothing."""
    report = tmp_path / "report.json"
    resolved = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--ignore-installed",
         "--disable-pip-version-check", "-r", str(RUNTIME), "--report", str(report)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resolved.returncode == 0, resolved.stderr[-2000:]
    installed = {
        _name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert installed == _pins(RUNTIME)
