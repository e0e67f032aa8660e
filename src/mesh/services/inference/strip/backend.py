"""The pixel-heavy steps, on the CPU (OpenCV) or on the GPU (CuPy): downscaling and the rectified crop.

Everything after these two steps works on small arrays (a 512-pixel overview, a crop of a few hundred
thousand pixels, 1-D profiles) and runs on the CPU in both cases, so CPU and GPU give the same verdicts: both
backends compute the same box-filter downscale (an integer factor) and the same bilinear rectification.

:class:`ArrayBackend` is written against the NumPy API; with ``xp=cupy`` and ``cupyx.scipy.ndimage`` it is
the GPU path, with ``xp=numpy`` and ``scipy.ndimage`` it runs the very same code on the CPU, which is how the
GPU logic is tested on machines without a GPU.
"""

from __future__ import annotations

import importlib
import math
import threading
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Protocol

import cv2
import numpy as np
import numpy.typing as npt

from mesh.kit import devices
from mesh.kit.pinned import PinnedBuffer

FloatImage = npt.NDArray[Any]  # OpenCV returns loosely typed arrays
ByteImage = npt.NDArray[Any]  # OpenCV returns loosely typed arrays


@dataclass(frozen=True)
class CropGeometry:
    """A rotated rectangle of the input image, resampled to ``size`` pixels at ``scale`` crop px per image px."""

    center_x: float
    center_y: float
    angle_rad: float
    scale: float
    size_x: int
    size_y: int

    def to_image(self, u: float, v: float) -> tuple[float, float]:
        """Crop pixel (u, v) -> input image pixel (x, y)."""
        du = (u - (self.size_x - 1) / 2) / self.scale
        dv = (v - (self.size_y - 1) / 2) / self.scale
        cos, sin = math.cos(self.angle_rad), math.sin(self.angle_rad)
        return self.center_x + cos * du - sin * dv, self.center_y + sin * du + cos * dv


class Backend(Protocol):
    """Downscale and rectify; ``name`` is "cpu" or "gpu"."""

    name: str

    def downscale(self, image: ByteImage, factor: int) -> ByteImage:
        """Box-filter downscale by an integer factor, in the steps of :func:`downscale_steps`, each rounded
        to 8 bits."""
        ...

    def rectify(self, image: ByteImage, geometry: CropGeometry) -> FloatImage:
        """The rotated rectangle ``geometry`` resampled (bilinear), float 0..1, replicated borders."""
        ...


def downscale_steps(factor: int) -> list[int]:
    """The integer steps a downscale by ``factor`` is made in: halvings first, then the odd rest.

    OpenCV halves an 8-bit image several times faster than it shrinks it by any other factor (4x for 1080p
    by 4), so both backends halve first, rounding to 8 bits after every step, and give the same pixels.
    """
    steps = []
    while factor % 2 == 0 and factor > 1:
        steps.append(2)
        factor //= 2
    if factor > 1:
        steps.append(factor)
    return steps


class CpuBackend:
    """OpenCV on the CPU."""

    name = "cpu"

    def downscale(self, image: ByteImage, factor: int) -> ByteImage:
        height, width = image.shape[:2]
        if factor > 1:
            h, w = height // factor, width // factor
            image = image[: h * factor, : w * factor]
            for step in downscale_steps(factor):
                h, w = image.shape[0] // step, image.shape[1] // step
                image = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
        return np.asarray(image, dtype=np.uint8)

    def rectify(self, image: ByteImage, geometry: CropGeometry) -> FloatImage:
        g = geometry
        cos, sin = math.cos(g.angle_rad), math.sin(g.angle_rad)
        cu, cv = (g.size_x - 1) / 2, (g.size_y - 1) / 2
        # Inverse map: crop (u, v) -> image (x, y).
        matrix = np.array(
            [
                [cos / g.scale, -sin / g.scale, g.center_x - (cos * cu - sin * cv) / g.scale],
                [sin / g.scale, cos / g.scale, g.center_y - (sin * cu + cos * cv) / g.scale],
            ],
            dtype=np.float64,
        )
        crop = cv2.warpAffine(
            image,
            matrix,
            (g.size_x, g.size_y),
            flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_REPLICATE,
        )
        return np.asarray(crop, dtype=np.float32) * np.float32(1 / 255)


class ArrayBackend:
    """The same two steps written against an array module (CuPy on the GPU, NumPy to test that code)."""

    def __init__(self, xp: ModuleType, ndimage: ModuleType, name: str) -> None:
        self.xp = xp
        self.ndimage = ndimage
        self.name = name
        # Per thread: the last image uploaded (downscale and rectify read the same one) and a pinned staging
        # buffer, grown as needed. A pageable upload goes through the driver's own staging at a fraction of
        # the rate, and uploading twice would double it.
        self._local = threading.local()

    def _device_image(self, image: ByteImage, *, fresh: bool = False) -> Any:
        """``image`` on the device: uploaded when ``fresh`` (the first step of a reading, since a caller may
        refill the same array between readings: the old pixels were read again), else reused from that upload
        when it is the same array (the reading's later steps)."""
        if self.xp is np:
            return image
        last = getattr(self._local, "last", None)
        if not fresh and last is not None and last[0]() is image:
            return last[1]
        image = np.ascontiguousarray(image)
        staging = getattr(self._local, "staging", None)
        if staging is None:
            staging = self._local.staging = PinnedBuffer(self.xp)
        host = staging.array(image.nbytes)
        device = self.xp.empty(image.shape, dtype=image.dtype)
        if host is None:  # too large to pin
            device.set(image)
        else:
            staged = host.view(image.dtype).reshape(image.shape)
            np.copyto(staged, image)
            device.set(staged)
        self._local.last = (weakref.ref(image), device)
        return device

    def _to_host(self, array: Any) -> FloatImage:
        if self.xp is np:
            return np.asarray(array, dtype=np.float32)
        return np.asarray(self.xp.asnumpy(array), dtype=np.float32)

    def downscale(self, image: ByteImage, factor: int) -> ByteImage:
        xp = self.xp
        height, width = image.shape[:2]
        h, w = height // factor, width // factor
        device = self._device_image(image, fresh=True)[: h * factor, : w * factor]
        if factor > 1:
            for step in downscale_steps(factor):
                h, w = device.shape[0] // step, device.shape[1] // step
                shape = (h, step, w, step, *tuple(image.shape[2:]))
                # Mean of each block, rounded to 8 bits as OpenCV's INTER_AREA does.
                device = xp.floor(device.reshape(shape).astype(xp.float32).mean(axis=(1, 3)) + 0.5)
        host = device if xp is np else xp.asnumpy(device)
        return np.asarray(host, dtype=np.uint8)

    def rectify(self, image: ByteImage, geometry: CropGeometry) -> FloatImage:
        xp = self.xp
        g = geometry
        cos, sin = math.cos(g.angle_rad), math.sin(g.angle_rad)
        vv, uu = xp.mgrid[0 : g.size_y, 0 : g.size_x].astype(xp.float32)
        du = (uu - (g.size_x - 1) / 2) / g.scale
        dv = (vv - (g.size_y - 1) / 2) / g.scale
        # Only the source region the crop samples (its corners' bounding box, one pixel more for bilinear
        # taps) becomes float: where that box meets the image's edge the edge stays the edge, so the
        # replicated border is the same.
        height, width = image.shape[:2]
        corners = [g.to_image(u, v) for u in (0, g.size_x - 1) for v in (0, g.size_y - 1)]
        x0 = max(0, math.floor(min(x for x, _ in corners)) - 1)
        x1 = min(width, math.ceil(max(x for x, _ in corners)) + 2)
        y0 = max(0, math.floor(min(y for _, y in corners)) - 1)
        y1 = min(height, math.ceil(max(y for _, y in corners)) + 2)
        x0, y0 = min(x0, width - 1), min(y0, height - 1)
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        xs = g.center_x - x0 + cos * du - sin * dv
        ys = g.center_y - y0 + sin * du + cos * dv
        device = self._device_image(image)[y0:y1, x0:x1].astype(xp.float32)
        coords = xp.stack([ys, xs])
        if device.ndim == 2:
            out = self.ndimage.map_coordinates(device, coords, order=1, mode="nearest")
        else:
            out = xp.stack(
                [
                    self.ndimage.map_coordinates(device[:, :, c], coords, order=1, mode="nearest")
                    for c in range(device.shape[2])
                ],
                axis=-1,
            )
        # Round to 8 bits like the OpenCV path, so both see the same pixel values.
        return self._to_host(xp.floor(out + 0.5) * (1 / 255))


def gpu_backend() -> ArrayBackend:
    """The CuPy backend; raises RuntimeError without CuPy or a CUDA device."""
    available, why = devices.gpu_available()
    if not available:
        raise RuntimeError(f"the GPU strip reader needs CuPy and a CUDA device: {why}")
    cupy = importlib.import_module("cupy")
    ndimage = importlib.import_module("cupyx.scipy.ndimage")
    return ArrayBackend(cupy, ndimage, "gpu")


def numpy_array_backend() -> ArrayBackend:
    """The GPU code path run by NumPy and SciPy on the CPU."""
    ndimage = importlib.import_module("scipy.ndimage")
    return ArrayBackend(np, ndimage, "cpu")
