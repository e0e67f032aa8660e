"""The CPU backend: OpenCV with its own thread pool on every core."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import cv2

from mesh.services.image_processing import cpu_filters
from mesh.services.image_processing.backend import stop_if_cancelled
from mesh.services.image_processing.filter_math import Image
from mesh.services.image_processing.registry import Device, Step


class CpuSession:
    """An image in host memory."""

    def __init__(self, image: Image) -> None:
        self._image = image

    def apply(self, step: Step) -> float:
        started = time.perf_counter()
        self._image = cpu_filters.apply(self._image, step)
        return time.perf_counter() - started

    def run(self, steps: Sequence[Step], cancel: threading.Event | None = None) -> list[float]:
        timings = []
        for step in steps:
            stop_if_cancelled(cancel, step)
            timings.append(self.apply(step))
        return timings

    def result(self) -> Image:
        return self._image


class CpuBackend:
    """Runs every filter with OpenCV/NumPy on the host."""

    @property
    def device(self) -> Device:
        return Device.CPU

    def start(self, image: Image) -> CpuSession:
        return CpuSession(image)

    def check(self) -> str:
        return f"cpu backend, OpenCV {cv2.__version__}, {cv2.getNumThreads()} threads"

    def warm_up(self) -> None:
        """Nothing is compiled on the CPU."""
