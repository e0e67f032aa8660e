"""The one interface both compute backends implement, and the choice between them.

A :class:`Session` holds one image on the backend's device while a pipeline runs over it, so a GPU pipeline
never returns to the host between steps; the image comes back only through :meth:`Session.result`. A run
checks its cancel flag (:func:`stop_if_cancelled`) before each step (each fused group on the GPU): a caller
that gave up does not keep the backend's threads busy to the end of its pipeline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from mesh.kit import errors
from mesh.kit.devices import DeviceSetting, resolve_device, without_gpu
from mesh.kit.health import FunctionCheck, in_thread_to_its_end
from mesh.kit.logging import describe
from mesh.services.image_processing.filter_math import Image
from mesh.services.image_processing.registry import Device, Step


class Session(Protocol):
    """One image resident on a backend while steps are applied to it."""

    def apply(self, step: Step) -> float:
        """Run one step; returns its time in seconds (device time on the GPU)."""
        ...

    def run(self, steps: Sequence[Step], cancel: threading.Event | None = None) -> list[float]:
        """Run several steps (a backend may fuse neighbours); returns each step's time in seconds. Calls
        :func:`stop_if_cancelled` before each step or fused group."""
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


def stop_if_cancelled(cancel: threading.Event | None, step: Step) -> None:
    """Raise CANCELLED, before ``step`` runs, once the pipeline's caller has gone away."""
    if cancel is not None and cancel.is_set():
        raise errors.Cancelled(
            f"the caller went away; the pipeline stopped before {step.filter} ({step.index})"
        )


def run_pipeline(
    backend: Backend, image: Image, steps: Sequence[Step], cancel: threading.Event | None = None
) -> PipelineOutput:
    """Run every step on the backend; the image stays on the device until the end. Once ``cancel`` is set,
    no further step starts (CANCELLED)."""
    started = time.perf_counter()
    session = backend.start(image)
    timings = tuple(zip((step.filter for step in steps), session.run(steps, cancel), strict=True))
    result = session.result()
    return PipelineOutput(result, timings, time.perf_counter() - started)


def health_check(backend: Backend) -> FunctionCheck:
    """The backend's health check, kept out of the threads that requests use: under load they are all busy,
    and a check queued behind them timed out, turning a working service NOT_SERVING. The CPU's check only
    formats a string, so it runs on the event loop; the GPU's asks the device, in a thread of its own."""
    name = f"compute-{backend.device.value}"
    if backend.device is Device.CPU:

        async def inline() -> str:
            return backend.check()

        return FunctionCheck(name, inline)
    thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu-health")

    async def in_own_thread() -> str:
        return await in_thread_to_its_end(backend.check, thread)

    return FunctionCheck(name, in_own_thread)


def select_backend(device: DeviceSetting, *, gpu_memory_limit_bytes: int = 0) -> Backend:
    """The backend for this process (:func:`mesh.kit.devices.resolve_device`): ``auto`` is the GPU when CuPy
    imports and sees a device; ``gpu`` without one raises :class:`~mesh.kit.errors.StartupError`."""
    from mesh.services.image_processing.cpu_backend import CpuBackend

    if resolve_device(device) == "gpu":
        # CuPy sees a device, but the backend also needs cupyx and compiles its kernels from this import on.
        try:
            from mesh.services.image_processing.gpu_backend import GpuBackend
        except ImportError as error:
            without_gpu(device, f"the GPU backend does not import: {describe(error)}")
        else:
            return GpuBackend(memory_limit_bytes=gpu_memory_limit_bytes)
    return CpuBackend()
