"""Host-side maths shared by both backends, so that they agree by construction.

Lookup tables (adjust, equalisation), Otsu's threshold from a histogram, fixed-point grey weights, Gaussian
coefficients, and the output geometry of resize, crop and rotate are computed here once, in NumPy, and handed
to the CPU or the GPU code; :func:`output_shapes` chains that geometry over a pipeline before it runs, bounding
every step's output, and :func:`plan_steps` adds the memory each step works in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

from mesh.kit import errors
from mesh.services.image_processing.registry import FILTERS, Shape, Step, StepImages
from mesh.services.image_processing.registry import gaussian_ksize as gaussian_ksize

Image = npt.NDArray[Any]
"""Pixels as (height, width, channels), channels 1, 3 or 4, RGB(A) order, uint8 or uint16."""

GRAY_SHIFT = 14
# 14-bit fixed-point weights (R, G, B), each set summing to 1 << 14, rounded half to even (cv2.transform).
GRAY_WEIGHTS: dict[str, tuple[int, int, int]] = {
    "bt709": (3483, 11718, 1183),
    "luminosity": (3441, 11796, 1147),
}
# BT.601 is OpenCV's cvtColor: 15-bit weights summing to 1 << 15, rounded half up, at 8 and 16 bits.
BT601_WEIGHTS = (9798, 19235, 3735)


def max_value(dtype: npt.DTypeLike) -> int:
    """The largest sample value of an image dtype."""
    return int(np.iinfo(np.dtype(dtype)).max)


def as_image(array: npt.NDArray[Any]) -> Image:
    """A (H, W, C) view of an OpenCV result that may have dropped the channel axis."""
    if array.ndim == 2:
        array = array[:, :, None]
    return array


def gaussian_kernel(ksize: int, sigma: float) -> npt.NDArray[Any]:
    """Normalised 1-D Gaussian coefficients (OpenCV's formula)."""
    return cv2.getGaussianKernel(ksize, sigma, cv2.CV_64F).ravel()


def adjust_lut(dtype: npt.DTypeLike, brightness: float, contrast: float, gamma: float) -> Image:
    """The lookup table of brightness, contrast and gamma for every sample value."""
    top = max_value(dtype)
    x = np.arange(top + 1, dtype=np.float64) / top
    y = np.clip((x - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    if gamma != 1.0:
        y = np.power(y, 1.0 / gamma)
    return np.rint(y * top).astype(dtype)


def otsu_threshold(hist: npt.NDArray[np.integer]) -> int:
    """Otsu's threshold: the t maximising between-class variance of classes <= t and > t."""
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    levels = np.arange(hist.size, dtype=np.float64)
    weight0 = np.cumsum(hist)
    sum0 = np.cumsum(hist * levels)
    weight1 = total - weight0
    with np.errstate(divide="ignore", invalid="ignore"):
        mu0 = sum0 / weight0
        mu1 = (sum0[-1] - sum0) / weight1
        between = weight0 * weight1 * (mu0 - mu1) ** 2
    between[~np.isfinite(between)] = -1.0
    best = float(between.max())
    if best <= 0:
        return 0
    # Near-equal maxima (float noise) resolve to the lowest level, as OpenCV's strict '>' scan does.
    return int(np.flatnonzero(between >= best * (1 - 1e-12))[0])


def equalize_lut(hist: npt.NDArray[np.integer], dtype: npt.DTypeLike) -> Image:
    """OpenCV's equalizeHist mapping generalised to any sample range."""
    top = max_value(dtype)
    hist = hist.astype(np.int64)
    nonzero = np.flatnonzero(hist)
    lut = np.zeros(top + 1, dtype=np.float64)
    if nonzero.size == 0:
        return lut.astype(dtype)
    first = int(nonzero[0])
    total = int(hist.sum())
    if hist[first] == total:
        return np.full(top + 1, first, dtype=dtype)
    # float32 arithmetic, as OpenCV's equalizeHist does it, so that both agree to the last bit.
    scale = np.float32(top) / np.float32(total - int(hist[first]))
    cumulative = np.cumsum(hist[first + 1 :], dtype=np.int64).astype(np.float32)
    lut[first + 1 :] = cumulative * scale
    return np.clip(np.rint(lut), 0, top).astype(dtype)


def resize_shape(height: int, width: int, step: Step, max_pixels: int | None = None) -> tuple[int, int]:
    """The (height, width) a resize step produces from an image of the given size; over ``max_pixels``
    (given when the pipeline is planned, :func:`output_shapes`) RESOURCE_EXHAUSTED naming the parameter."""
    scale = step.as_float("scale")
    target_w, target_h = step.as_int("width"), step.as_int("height")
    # A side derived from a ratio is at least 1 pixel: a thin image (1000x1 to width 100) keeps its one row
    # instead of coming out empty.
    if scale > 0:
        given = "scale"
        new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    elif target_w and target_h:
        given = "width"
        if step.as_bool("keep_aspect"):
            factor = min(target_w / width, target_h / height)
            new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
        else:
            new_w, new_h = target_w, target_h
    elif target_w:
        given = "width"
        new_w, new_h = target_w, max(1, round(height * target_w / width))
    else:
        given = "height"
        new_w, new_h = max(1, round(width * target_h / height)), target_h
    if max_pixels is not None:
        check_step_pixels(step, given, new_w, new_h, max_pixels)
    return new_h, new_w


def rotation(height: int, width: int, angle: float, expand: bool) -> tuple[npt.NDArray[Any], int, int]:
    """The 2x3 affine matrix (destination <- source, OpenCV convention) and output width and height."""
    centre = ((width - 1) / 2.0, (height - 1) / 2.0)
    matrix = cv2.getRotationMatrix2D(centre, angle, 1.0)
    out_w, out_h = width, height
    if expand:
        cos, sin = abs(matrix[0, 0]), abs(matrix[0, 1])
        out_w = round(height * sin + width * cos)
        out_h = round(height * cos + width * sin)
        matrix[0, 2] += (out_w - 1) / 2.0 - centre[0]
        matrix[1, 2] += (out_h - 1) / 2.0 - centre[1]
    return matrix, out_w, out_h


def crop_bounds(height: int, width: int, step: Step) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of a crop, checked against the image."""
    x, y = step.as_int("x"), step.as_int("y")
    if x >= width:
        raise step.invalid("x", f"must be < image width {width}, got {x}")
    if y >= height:
        raise step.invalid("y", f"must be < image height {height}, got {y}")
    w = step.as_int("width") or width - x
    h = step.as_int("height") or height - y
    if x + w > width:
        raise step.invalid("width", f"x + width must be <= image width {width}, got {x + w}")
    if y + h > height:
        raise step.invalid("height", f"y + height must be <= image height {height}, got {y + h}")
    return y, y + h, x, x + w


def output_shapes(
    height: int, width: int, channels: int, steps: Sequence[Step], max_pixels: int | None = None
) -> list[Shape]:
    """The (height, width, channels) after each step, from the parameters alone: what a pipeline will make,
    known before it runs. A step whose parameters do not fit the image it will get (a crop outside it) raises
    the INVALID_ARGUMENT it would raise when run, and a resize or rotation whose output would be over
    ``max_pixels`` (the service's limit on every image; None: no bound) RESOURCE_EXHAUSTED with reason
    PAYLOAD_TOO_LARGE, as an input over it is (no other step makes a larger image than it gets). This is the
    only bound on a step's size: the backends run what was planned here."""
    shapes = []
    for step in steps:
        if step.filter == "resize":
            height, width = resize_shape(height, width, step, max_pixels)
        elif step.filter == "crop":
            top, bottom, left, right = crop_bounds(height, width, step)
            height, width = bottom - top, right - left
        elif step.filter == "rotate":
            angle, expand = step.as_float("angle"), step.as_bool("expand")
            turns = right_angle_turns(angle, height, width, expand)
            if turns is None:
                _, width, height = rotation(height, width, angle, expand)
                if max_pixels is not None:
                    check_step_pixels(step, "angle", width, height, max_pixels)
            elif turns % 2:
                height, width = width, height
        if FILTERS[step.filter].output_channels == "1":
            channels = 1
        shapes.append((height, width, channels))
    return shapes


def check_step_pixels(step: Step, param: str, width: int, height: int, max_pixels: int) -> None:
    """RESOURCE_EXHAUSTED (reason PAYLOAD_TOO_LARGE, as for an input or a result over the limit) naming the
    step and its ``param`` when the step's ``width`` x ``height`` output is over ``max_pixels``: a 10x10 input
    resized to 10000x10000 and back is refused, not run through a 100-megapixel middle."""
    pixels = width * height
    if pixels <= max_pixels:
        return
    field = step.field(param)
    description = f"gives {width}x{height} = {pixels} pixels; a step's output may have at most {max_pixels}"
    raise errors.PayloadTooLarge(
        f"pipeline[{step.index}] ({step.filter}) output is {width}x{height} = {pixels} pixels; the limit is "
        f"{max_pixels}, for every step's output as for the input ({field})",
        field_violations=[errors.FieldViolation(field, description)],
    )


@dataclass(frozen=True)
class PlannedStep:
    """A step as planned before it runs: the images it takes and makes, and the memory its CPU code works in."""

    step: Step
    images: StepImages

    @property
    def working_bytes(self) -> int:
        """Its temporaries besides its input and output (the filter's ``working_memory``)."""
        return FILTERS[self.step.filter].working_memory(self.step, self.images)

    @property
    def nbytes(self) -> int:
        """Host bytes it holds at its peak on the CPU: its input, its output and its temporaries."""
        return self.images.input_bytes + self.images.output_bytes + self.working_bytes


def plan_steps(
    shape: Shape, itemsize: int, steps: Sequence[Step], max_pixels: int | None = None
) -> list[PlannedStep]:
    """Every step of a pipeline over an image of ``shape`` with ``itemsize``-byte samples, planned as
    :func:`output_shapes` plans them (and refused as it refuses them)."""
    after = output_shapes(*shape, steps, max_pixels)
    before = [shape, *after][: len(after)]
    return [
        PlannedStep(step, StepImages(taken, made, itemsize))
        for step, taken, made in zip(steps, before, after, strict=True)
    ]


def right_angle_turns(angle: float, height: int, width: int, expand: bool) -> int | None:
    """Quarter turns counter-clockwise when rotating an image of this size by ``angle`` is a transposition,
    else None (the affine warp). A quarter turn of a non-square image without ``expand`` is not one: it keeps
    the canvas (crops and fills), as 89.999 degrees does; transposing swapped the canvas's sides."""
    quarters = angle / 90.0
    if abs(quarters - round(quarters)) > 1e-9:
        return None
    turns = round(quarters) % 4
    if turns % 2 and not expand and height != width:
        return None
    return turns


def hsv_tables() -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32]]:
    """OpenCV's 8-bit RGB->HSV division tables (12-bit fixed point, full 0..255 hue range)."""
    i = np.arange(256, dtype=np.float64)
    sdiv = np.zeros(256, dtype=np.int32)
    hdiv = np.zeros(256, dtype=np.int32)
    sdiv[1:] = np.rint((255 << 12) / i[1:])
    hdiv[1:] = np.rint((256 << 12) / (6.0 * i[1:]))
    return sdiv, hdiv


def two_tap_table(in_n: int, out_n: int, mode: str) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Per output index: two source indices and the weight of the second, as OpenCV's resize computes them.

    ``mode`` is nearest, bilinear or area (area here is OpenCV's rule for enlarging).
    """
    inv = out_n / in_n
    scale = 1.0 / inv
    d = np.arange(out_n, dtype=np.float64)
    if mode == "nearest":
        first = np.minimum(np.floor(d * scale), in_n - 1).astype(np.int64)
        return np.repeat(first, 2).astype(np.int32), np.zeros(out_n, dtype=np.float32)
    if mode == "area":
        start = np.floor(d * scale)
        frac = (d + 1) - (start + 1) * inv
        frac = np.where(frac <= 0, 0.0, frac - np.floor(frac))
    else:
        position = (d + 0.5) * scale - 0.5
        start = np.floor(position)
        frac = position - start
    first = start.astype(np.int64)
    frac = np.where(first < 0, 0.0, frac)
    first = np.maximum(first, 0)
    frac = np.where(first >= in_n - 1, 0.0, frac)
    first = np.minimum(first, in_n - 1)
    second = np.minimum(first + 1, in_n - 1)
    return np.stack([first, second], axis=1).ravel().astype(np.int32), frac.astype(np.float32)


def area_table(
    in_n: int, out_n: int
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Overlap weights of area downscaling (OpenCV's computeResizeAreaTab) as CSR: starts, indices, weights."""
    scale = in_n / out_n
    starts = [0]
    indices: list[int] = []
    weights: list[float] = []
    for dx in range(out_n):
        fsx1 = dx * scale
        fsx2 = fsx1 + scale
        cell = min(scale, in_n - fsx1)
        sx1 = math.ceil(fsx1)
        sx2 = min(math.floor(fsx2), in_n - 1)
        sx1 = min(sx1, sx2)
        if sx1 - fsx1 > 1e-3:
            indices.append(sx1 - 1)
            weights.append((sx1 - fsx1) / cell)
        for sx in range(sx1, sx2):
            indices.append(sx)
            weights.append(1.0 / cell)
        if fsx2 - sx2 > 1e-3:
            indices.append(sx2)
            weights.append(min(min(fsx2 - sx2, 1.0), cell) / cell)
        starts.append(len(indices))
    return (
        np.asarray(starts, dtype=np.int32),
        np.asarray(indices, dtype=np.int32),
        np.asarray(weights, dtype=np.float32),
    )
