"""The host-side tables the GPU kernels use, checked against OpenCV on the CPU (no GPU needed).

The resize kernels read these tables; emulating the kernels' arithmetic in NumPy here pins that the GPU path
follows OpenCV's resize within 1 LSB (nearest exactly), and that the HSV and equalisation tables reproduce
OpenCV's integer algorithms.
"""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from mesh.services.image_processing import cpu_filters
from mesh.services.image_processing import filter_math as fm
from tests.image_processing.images import noise

Array = npt.NDArray[Any]
CV_MODES = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def _two_tap(image: Array, out_h: int, out_w: int, mode: str) -> Array:
    """NumPy twin of the resample2 kernel."""
    yi, yw = fm.two_tap_table(image.shape[0], out_h, mode)
    xi, xw = fm.two_tap_table(image.shape[1], out_w, mode)
    f = image.astype(np.float32)
    y0, y1, x0, x1 = yi[0::2], yi[1::2], xi[0::2], xi[1::2]
    wx = xw[None, :, None]
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bottom = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return np.clip(np.rint(top * (1 - yw[:, None, None]) + bottom * yw[:, None, None]), 0, 255)


def _area(image: Array, out_h: int, out_w: int) -> Array:
    """NumPy twin of the resample_area kernel."""
    ys, yi, yw = fm.area_table(image.shape[0], out_h)
    xs, xi, xw = fm.area_table(image.shape[1], out_w)
    rows = np.zeros((out_h, image.shape[0]))
    cols = np.zeros((out_w, image.shape[1]))
    for j in range(out_h):
        rows[j, yi[ys[j] : ys[j + 1]]] += yw[ys[j] : ys[j + 1]]
    for j in range(out_w):
        cols[j, xi[xs[j] : xs[j + 1]]] += xw[xs[j] : xs[j + 1]]
    mixed: Array = np.einsum("ay,yxc,bx->abc", rows, image.astype(np.float64), cols)
    return np.clip(np.rint(mixed), 0, 255)


@pytest.mark.parametrize("size", [(30, 40), (23, 31), (97, 131), (20, 200)])
@pytest.mark.parametrize("mode", ["nearest", "bilinear", "area"])
def test_resize_tables_follow_opencv(size: tuple[int, int], mode: str) -> None:
    """The GPU resize arithmetic equals cv2.resize: nearest exactly, bilinear and area within 1 LSB."""
    image = noise(60, 80, 3, seed=30)
    out_h, out_w = size
    expected = cv2.resize(image, (out_w, out_h), interpolation=CV_MODES[mode]).astype(np.int64)
    shrinking = out_h <= 60 and out_w <= 80
    actual = (
        _area(image, out_h, out_w) if mode == "area" and shrinking else _two_tap(image, out_h, out_w, mode)
    )
    limit = 0 if mode == "nearest" else 1
    assert np.abs(expected - actual).max() <= limit


def test_hsv_integer_algorithm_matches_opencv() -> None:
    """The rgb_to_hsv kernel's 8-bit integer algorithm, in NumPy, equals cv2 RGB2HSV_FULL exactly."""
    rgb = noise(200, 200, 3, seed=31)
    sdiv, hdiv = (t.astype(np.int64) for t in fm.hsv_tables())
    r, g, b = (rgb[:, :, i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    vr = np.where(v == r, -1, 0)
    vg = np.where(v == g, -1, 0)
    s = (diff * sdiv[v] + (1 << 11)) >> 12
    h = (vr & (g - b)) + (~vr & ((vg & (b - r + 2 * diff)) + (~vg & (r - g + 4 * diff))))
    h = (h * hdiv[diff] + (1 << 11)) >> 12
    h = np.clip(h + np.where(h < 0, 256, 0), 0, 255)
    expected = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    assert np.array_equal(np.stack([h, s, v], axis=2), expected)


def test_equalize_table_matches_opencv() -> None:
    """The equalisation table the GPU applies equals cv2.equalizeHist on 8-bit data."""
    for seed in range(3):
        channel = (noise(50, 40, 1, seed=seed)[:, :, 0] // (seed + 2) + 17).astype(np.uint8)
        table = fm.equalize_lut(cpu_filters.histogram(channel), np.dtype(np.uint8))
        assert np.array_equal(table[channel], cv2.equalizeHist(channel))


def test_grey_fixed_point_rounding_matches_cpu() -> None:
    """The grayscale kernel's integer rounding (half to even of S / 2^14) equals the CPU filter at 8 bits."""
    rgb = noise(64, 64, 3, seed=32)
    for method, (wr, wg, wb) in fm.GRAY_WEIGHTS.items():
        wide = rgb.astype(np.int64)
        total = wide[:, :, 0] * wr + wide[:, :, 1] * wg + wide[:, :, 2] * wb
        q, rem = total >> 14, total & 16383
        kernel = q + ((rem > 8192) | ((rem == 8192) & (q & 1 == 1)))
        assert np.array_equal(kernel, cpu_filters.grey_of(rgb, method)[:, :, 0]), method


@pytest.mark.parametrize(("angle", "expand"), [(30.0, True), (17.0, False), (-45.0, True)])
def test_warp_coordinates_follow_opencv(angle: float, expand: bool) -> None:
    """The warp_affine kernel's float32 source coordinates reproduce cv2.warpAffine: bilinear within 1 LSB,
    nearest equal on at least 99.9% of pixels (ties at half pixels may round the other way)."""
    image = noise(67, 93, 3, seed=33)
    matrix, out_w, out_h = fm.rotation(67, 93, angle, expand)
    inverse = cv2.invertAffineTransform(matrix).astype(np.float32)
    y, x = np.mgrid[0:out_h, 0:out_w].astype(np.float32)
    sx = inverse[0, 0] * x + inverse[0, 1] * y + inverse[0, 2]
    sy = inverse[1, 0] * x + inverse[1, 1] * y + inverse[1, 2]
    samples = image.astype(np.float64)

    def tap(yy: Array, xx: Array) -> Array:
        inside = (xx >= 0) & (yy >= 0) & (xx < 93) & (yy < 67)
        values = np.zeros((out_h, out_w, 3))
        values[inside] = samples[yy[inside], xx[inside]]
        return values

    ix, iy = np.floor(sx).astype(np.int64), np.floor(sy).astype(np.int64)
    fx, fy = (sx - ix)[..., None], (sy - iy)[..., None]
    top = tap(iy, ix) * (1 - fx) + tap(iy, ix + 1) * fx
    bottom = tap(iy + 1, ix) * (1 - fx) + tap(iy + 1, ix + 1) * fx
    bilinear = np.rint(top * (1 - fy) + bottom * fy)
    expected = cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_LINEAR, borderValue=0)
    assert np.abs(bilinear - expected.astype(np.int64)).max() <= 1
    nearest = tap(np.rint(sy).astype(np.int64), np.rint(sx).astype(np.int64))
    expected_nearest = cv2.warpAffine(image, matrix, (out_w, out_h), flags=cv2.INTER_NEAREST, borderValue=0)
    assert (nearest == expected_nearest).all(axis=2).mean() >= 0.999
