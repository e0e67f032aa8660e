"""The one interface both compute backends implement, and the choice between them.

A :class:`Session` holds one image on the backend's device while a pipeline runs over it, so a GPU pipeline
never returns to the host between steps; the image comes back only through :meth:`Session.result`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from mesh.kit.logging import get_logger
from mesh.services.image_processing.filter_math import Image
from mesh.services.image_processing.registry import Device, Step

log = get_logger(__name__)


class Session(Protocol):
    """One image resident on a backend while steps are applied to it."""

    def apply(self, step: Step) -> float:
        """Run one step; returns its time in seconds (device time on the GPU)."""
        ...

    def run(self, steps: Sequence[Step]) -> list[float]:
        """Run several steps (a backend may fuse neighbours); returns each step's time in seconds."""
        ...

    def result(self) -> Image:
        """The current image, on the host."""
        ...


class Backend(Protocol):
    """A compute backend: CPU (OpenCV) or GPU (CuPy)."""

    @property
    def device(self) -> Device:
        """Which device it runs on."""
        ...

    def start(self, image: Image) -> Session:
        """Place ``image`` on the device for a pipeline."""
        ...

    def check(self) -> str:
        """Raise when the device is unusable (health); return a short description."""
        ...

    def warm_up(self) -> None:
        """Compile and run every kernel once, so no request pays for it."""
        ...


@dataclass(frozen=True)
class PipelineOutput:
    """A pipeline's result image and each step's time."""

    image: Image
    timings: tuple[tuple[str, float], ...]
    total_seconds: float


def run_pipeline(backend: Backend, image: Image, steps: Sequence[Step]) -> PipelineOutput:
    """Run every step on the backend; the image stays on the device until the end."""
    started = time.perf_counter()
    session = backend.start(image)
    timings = tuple(zip((step.filter for step in steps), session.run(steps), strict=True))
    result = session.result()
    return PipelineOutput(result, timings, time.perf_counter() - started)


def select_backend(device: Literal["auto", "gpu", "cpu"], *, gpu_memory_limit_bytes: int = 0) -> Backend:
    """The backend for this process: ``auto`` is the GPU when CuPy imports and sees a device."""
    from mesh.services.image_processing.cpu_backend import CpuBackend

    if device == "cpu":
        return CpuBackend()
    try:
        from mesh.services.image_processing.gpu_backend import GpuBackend, gpu_available

        available, why = gpu_available()
        if available:
            return GpuBackend(memory_limit_bytes=gpu_memory_limit_bytes)
    except ImportError as error:
        why = f"GPU backend unavailable: {error}"
    if device == "gpu":
        raise RuntimeError(f"MESH_DEVICE=gpu but {why}")
    log.info("using the CPU backend", reason=why)
    return CpuBackend()
