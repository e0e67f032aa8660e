"""Where a process computes: whether CuPy sees a CUDA device, and what ``MESH_DEVICE`` resolves to.

CuPy is imported only when asked (never when this module loads): a CPU-only install has no CuPy, and
importing it initialises CUDA, which a process with ``MESH_DEVICE=cpu`` must not pay for.
"""

from __future__ import annotations

import importlib
from typing import Literal, TypeAlias

from mesh.kit.errors import StartupError
from mesh.kit.logging import describe, get_logger

log = get_logger(__name__)

DeviceSetting: TypeAlias = Literal["auto", "gpu", "cpu"]
DeviceName: TypeAlias = Literal["cpu", "gpu"]


def gpu_available() -> tuple[bool, str]:
    """Whether CuPy imports and sees a CUDA device; the text says why not (or how many it sees)."""
    try:
        cupy = importlib.import_module("cupy")
    except ModuleNotFoundError as error:
        if (error.name or "").partition(".")[0] == "cupy":
            return False, "CuPy is not installed"
        return False, f"CuPy does not import: {describe(error)}"
    # A CuPy built for another CUDA, or without its libraries, fails on import with errors of many kinds.
    except Exception as error:
        return False, f"CuPy does not import: {describe(error)}"
    try:
        count = int(cupy.cuda.runtime.getDeviceCount())
    # No driver, or one too old, is a CUDARuntimeError; anything else CuPy raises here means no GPU either.
    except Exception as error:
        return False, f"no CUDA device: {describe(error)}"
    if count < 1:
        return False, "no CUDA device"
    return True, f"{count} CUDA device(s)"


def resolve_device(setting: DeviceSetting) -> DeviceName:
    """What ``MESH_DEVICE=setting`` means here: ``cpu`` is the CPU without touching CuPy; ``auto`` the GPU
    when CuPy sees one, else the CPU; ``gpu`` without one is a :class:`StartupError` (see
    :func:`without_gpu`)."""
    if setting == "cpu":
        return "cpu"
    available, why = gpu_available()
    if available:
        return "gpu"
    return without_gpu(setting, why)


def without_gpu(setting: DeviceSetting, why: str) -> Literal["cpu"]:
    """The CPU when no GPU is usable (``why``), logged, or a :class:`StartupError` for ``MESH_DEVICE=gpu``,
    whose message names the setting and the way out."""
    if setting == "gpu":
        raise StartupError(f"MESH_DEVICE=gpu but {why}; set MESH_DEVICE=cpu or auto to run on the CPU")
    log.info("no usable GPU: computing on the CPU", reason=why)
    return "cpu"
