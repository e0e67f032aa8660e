"""The one GPU check and MESH_DEVICE resolution (mesh.kit.devices), with CuPy absent, broken, deviceless and
emulated (``tests/image_processing/fake_cupy``); no GPU is needed."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import subprocess
import sys
import types
from collections.abc import Callable, Iterator, Sequence

import pytest

from mesh.kit import devices
from mesh.kit.errors import StartupError
from tests.image_processing import fake_cupy

CUPY_MODULES = ("cupy", "cupyx", "cupyx.scipy", "cupyx.scipy.ndimage")
TOO_OLD = "CUDA driver version is insufficient for CUDA runtime version"


@pytest.fixture
def no_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    """``import cupy`` fails as it does where CuPy is not installed, whatever this machine has."""
    monkeypatch.setitem(sys.modules, "cupy", None)


@pytest.fixture
def emulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emulated CuPy, which reports one CUDA device."""
    for name, module in fake_cupy.build().items():
        monkeypatch.setitem(sys.modules, name, module)


def _cupy_whose_device_count(count: Callable[[], int]) -> types.ModuleType:
    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=count))  # type: ignore[attr-defined]
    return module


class _BrokenCupyFinder(importlib.abc.MetaPathFinder):
    """Finds a ``cupy`` whose import raises what a CuPy built for another CUDA raises."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        return importlib.machinery.ModuleSpec(fullname, self) if fullname == "cupy" else None  # type: ignore[arg-type]

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        raise RuntimeError(TOO_OLD)


@pytest.fixture
def broken_cupy(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``import cupy`` raises RuntimeError, as a CuPy built for a newer CUDA than the driver's does."""
    for name in CUPY_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    finder = _BrokenCupyFinder()
    sys.meta_path.insert(0, finder)
    try:
        yield
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("cupy", None)


@pytest.mark.usefixtures("no_cupy")
def test_without_cupy_there_is_no_gpu_and_the_reason_says_so() -> None:
    """No CuPy: no GPU, because CuPy is not installed."""
    assert devices.gpu_available() == (False, "CuPy is not installed")


@pytest.mark.usefixtures("broken_cupy")
def test_a_cupy_that_fails_to_import_is_no_gpu_with_its_error() -> None:
    """A CuPy whose import raises something other than ImportError (a driver too old) means no GPU, and the
    reason carries the error, rather than the error escaping at start-up."""
    assert devices.gpu_available() == (False, f"CuPy does not import: RuntimeError: {TOO_OLD}")


def test_a_cupy_without_a_device_is_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy that counts no device, or whose runtime fails to count (no driver), means no GPU, with why."""
    monkeypatch.setitem(sys.modules, "cupy", _cupy_whose_device_count(lambda: 0))
    assert devices.gpu_available() == (False, "no CUDA device")

    def no_driver() -> int:
        raise OSError("cudaErrorNoDevice: no CUDA-capable device is detected")

    monkeypatch.setitem(sys.modules, "cupy", _cupy_whose_device_count(no_driver))
    assert devices.gpu_available() == (
        False,
        "no CUDA device: OSError: cudaErrorNoDevice: no CUDA-capable device is detected",
    )


@pytest.mark.usefixtures("emulated")
def test_an_emulated_cupy_with_a_device_is_a_gpu() -> None:
    """CuPy that imports and counts a device: a GPU, and how many."""
    assert devices.gpu_available() == (True, "1 CUDA device(s)")


@pytest.mark.usefixtures("emulated")
def test_auto_and_gpu_resolve_to_the_gpu_when_there_is_one() -> None:
    """MESH_DEVICE=auto and gpu both compute on a GPU that CuPy sees; cpu stays on the CPU."""
    assert devices.resolve_device("auto") == "gpu"
    assert devices.resolve_device("gpu") == "gpu"
    assert devices.resolve_device("cpu") == "cpu"


@pytest.mark.usefixtures("no_cupy")
def test_without_a_gpu_auto_is_the_cpu_and_gpu_stops_the_start() -> None:
    """MESH_DEVICE=auto falls back to the CPU; MESH_DEVICE=gpu is a StartupError naming why and the way out."""
    assert devices.resolve_device("auto") == "cpu"
    with pytest.raises(StartupError) as stopped:
        devices.resolve_device("gpu")
    assert str(stopped.value) == (
        "MESH_DEVICE=gpu but CuPy is not installed; set MESH_DEVICE=cpu or auto to run on the CPU"
    )


def test_cpu_never_asks_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    """MESH_DEVICE=cpu resolves without importing CuPy (which would initialise CUDA)."""

    def refuse() -> tuple[bool, str]:
        raise AssertionError("MESH_DEVICE=cpu asked for the GPU")

    monkeypatch.setattr(devices, "gpu_available", refuse)
    assert devices.resolve_device("cpu") == "cpu"


def test_no_module_that_chooses_a_device_imports_cupy_when_it_loads() -> None:
    """Loading the device check and the modules that use it tries no CuPy import: only asking does."""
    script = (
        "import sys\n"
        "tried = []\n"
        "class Spy:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name.partition('.')[0] in ('cupy', 'cupyx'):\n"
        "            tried.append(name)\n"
        "sys.meta_path.insert(0, Spy)\n"
        "import mesh.kit.devices, mesh.services.inference.models, mesh.services.inference.strip.backend\n"
        "import mesh.services.image_processing.backend\n"
        "print(tried)\n"
    )
    tried = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert tried.strip() == "[]"
