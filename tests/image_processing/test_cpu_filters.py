"""Golden tests of every filter on the CPU backend, against independent NumPy/SciPy references."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from scipy import ndimage

from mesh.kit import errors
from mesh.services.image_processing import cpu_filters, filter_math
from mesh.services.image_processing.backend import run_pipeline
from mesh.services.image_processing.cpu_backend import CpuBackend
from mesh.services.image_processing.registry import FILTERS, validate_pipeline
from tests.image_processing.images import LAYOUTS, noise, smooth, step

Array = npt.NDArray[Any]
NP_PAD = {"reflect": "reflect", "clamp": "edge", "wrap": "wrap", "constant": "constant"}


def _run(name: str, image: Array, **params: Any) -> Array:
    return cpu_filters.apply(image, step(name, **params))


def _maxdiff(a: Array, b: Array) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


def _separable(image: Array, kernel: Array, border: str) -> Array:
    """Reference correlation with a 1-D kernel along both axes, via NumPy padding."""
    radius = kernel.size // 2
    height, width = image.shape[:2]
    mode: Any = NP_PAD[border]
    padded = np.pad(image.astype(np.float64), ((radius, radius), (radius, radius), (0, 0)), mode=mode)
    horizontal = sum(kernel[i] * padded[:, i : i + width, :] for i in range(kernel.size))
    vertical: Array = sum(kernel[i] * horizontal[i : i + height, :, :] for i in range(kernel.size))
    return np.rint(vertical)


# Every filter, with parameters that make it do something, on every layout.
SAMPLE_PARAMS: dict[str, dict[str, Any]] = {
    "resize": {"scale": 0.5},
    "rotate": {"angle": 30.0},
    "crop": {"x": 3, "y": 2, "width": 10, "height": 7},
}


@pytest.mark.parametrize(("dtype", "channels"), LAYOUTS)
@pytest.mark.parametrize("name", sorted(FILTERS))
def test_every_filter_handles_every_layout(name: str, dtype: Any, channels: int) -> None:
    """Grey, RGB and RGBA at 8 and 16 bits: same dtype out, channel count as the catalogue states.

    The input is read-only, as raw pixels straight from a request are.
    """
    image = smooth(24, 32, channels, dtype)
    image.setflags(write=False)
    if name == "convert_color" and channels == 1:
        with pytest.raises(errors.InvalidArgument):
            _run(name, image)
        return
    out = _run(name, image, **SAMPLE_PARAMS.get(name, {}))
    assert out.dtype == dtype
    assert out.ndim == 3
    expected = channels if FILTERS[name].output_channels == "same" else int(FILTERS[name].output_channels)
    assert out.shape[2] == expected


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grayscale_bt601_is_15_bit_fixed_point(dtype: Any) -> None:
    """bt601 = (9798 R + 19235 G + 3735 B + 2^14) >> 15 exactly, at 8 and 16 bits (OpenCV's cvtColor)."""
    image = noise(31, 29, 4, dtype)
    rgb = image.astype(np.int64)
    expected = (rgb[:, :, 0] * 9798 + rgb[:, :, 1] * 19235 + rgb[:, :, 2] * 3735 + 16384) >> 15
    assert np.array_equal(_run("grayscale", image)[:, :, 0], expected)


@pytest.mark.parametrize("method", ["bt709", "luminosity"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_grayscale_weighted_matches_fixed_point_formula(method: str, dtype: Any) -> None:
    """Weighted grey = 14-bit fixed-point sum of R, G, B, rounded half to even (exact at 8 bits)."""
    image = noise(31, 29, 3, dtype)
    wr, wg, wb = filter_math.GRAY_WEIGHTS[method]
    rgb = image.astype(np.int64)
    total = rgb[:, :, 0] * wr + rgb[:, :, 1] * wg + rgb[:, :, 2] * wb
    expected = np.rint(total / 16384.0)
    out = _run("grayscale", image, method=method)[:, :, 0]
    assert _maxdiff(out, expected) <= (0 if dtype == np.uint8 else 1)


def test_grayscale_average_and_lightness() -> None:
    """average = round((R+G+B)/3); lightness = round-half-even((max+min)/2); alpha is ignored."""
    image = noise(17, 23, 4)
    rgb = image[:, :, :3].astype(np.int64)
    average = _run("grayscale", image, method="average")[:, :, 0]
    assert _maxdiff(average, (rgb.sum(axis=2) + 1) // 3) == 0
    lightness = _run("grayscale", image, method="lightness")[:, :, 0]
    assert _maxdiff(lightness, np.rint((rgb.max(axis=2) + rgb.min(axis=2)) / 2)) == 0


def test_grayscale_of_grey_is_identity() -> None:
    """A one-channel image comes back unchanged."""
    image = noise(8, 9, 1)
    assert np.array_equal(_run("grayscale", image), image)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_invert_keeps_alpha(dtype: Any) -> None:
    """invert is max - x on colour channels; alpha stays."""
    image = noise(9, 11, 4, dtype)
    out = _run("invert", image)
    top = np.iinfo(dtype).max
    assert np.array_equal(out[:, :, :3], top - image[:, :, :3])
    assert np.array_equal(out[:, :, 3], image[:, :, 3])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_adjust_matches_formula(dtype: Any) -> None:
    """adjust = clip((x - .5) * contrast + .5 + brightness) ^ (1/gamma) on 0..1 values, alpha kept."""
    image = noise(13, 7, 4, dtype)
    top = float(np.iinfo(dtype).max)
    out = _run("adjust", image, brightness=0.1, contrast=1.5, gamma=2.2)
    x = image[:, :, :3] / top
    expected = np.rint(np.clip((x - 0.5) * 1.5 + 0.6, 0, 1) ** (1 / 2.2) * top)
    assert _maxdiff(out[:, :, :3], expected) == 0
    assert np.array_equal(out[:, :, 3], image[:, :, 3])
    assert np.array_equal(_run("adjust", image), image)


@pytest.mark.parametrize("border", ["reflect", "clamp", "wrap", "constant"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_gaussian_blur_matches_separable_reference(border: str, dtype: Any) -> None:
    """Gaussian blur equals a float64 separable correlation with the same kernel, within 1 LSB."""
    image = noise(33, 41, 3, dtype, seed=3)
    out = _run("gaussian_blur", image, sigma=1.5, border=border)
    kernel = filter_math.gaussian_kernel(filter_math.gaussian_ksize(1.5, 0), 1.5)
    assert _maxdiff(out, _separable(image, kernel, border)) <= 1


def test_gaussian_blur_wrap_with_kernel_wider_than_image() -> None:
    """Wrap still tiles when the kernel is wider than the image."""
    image = noise(6, 5, 1, seed=4)
    out = _run("gaussian_blur", image, sigma=3.0, border="wrap")
    kernel = filter_math.gaussian_kernel(filter_math.gaussian_ksize(3.0, 0), 3.0)
    assert _maxdiff(out, _separable(image, kernel, "wrap")) <= 1


@pytest.mark.parametrize("border", ["reflect", "clamp", "wrap", "constant"])
def test_box_blur_matches_window_mean(border: str) -> None:
    """Box blur = mean of the k x k window, rounded."""
    image = noise(21, 19, 3, seed=5)
    out = _run("box_blur", image, ksize=5, border=border)
    assert _maxdiff(out, _separable(image, np.full(5, 1 / 5), border)) <= 1


@pytest.mark.parametrize("ksize", [3, 5])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_median_matches_scipy(ksize: int, dtype: Any) -> None:
    """Median equals scipy's median filter with repeated edges, exactly."""
    image = noise(19, 23, 3, dtype, seed=6)
    expected = ndimage.median_filter(image, size=(ksize, ksize, 1), mode="nearest")
    assert np.array_equal(_run("median", image, ksize=ksize), expected)


def test_unsharp_mask_formula_and_flat_invariance() -> None:
    """Unsharp = x + amount * (x - blur(x)); a flat image is unchanged; threshold leaves small detail."""
    flat = np.full((16, 16, 3), 77, dtype=np.uint8)
    assert np.array_equal(_run("unsharp_mask", flat, amount=2.0), flat)
    image = smooth(32, 32, 1)
    blurred = _run("gaussian_blur", image, sigma=1.0)
    expected = np.clip(np.rint(image * 2.0 - blurred.astype(np.float64)), 0, 255)
    assert _maxdiff(_run("unsharp_mask", image, sigma=1.0, amount=1.0), expected) <= 1
    untouched = _run("unsharp_mask", image, amount=1.0, threshold=255)
    assert np.array_equal(untouched, image)


@pytest.mark.parametrize("direction", ["x", "y", "magnitude"])
def test_sobel_matches_scipy(direction: str) -> None:
    """Sobel 3x3 equals scipy.ndimage.sobel (mirror border), absolute and saturated."""
    image = noise(20, 24, 1, seed=7)
    grey = image[:, :, 0].astype(np.float64)
    dx = ndimage.sobel(grey, axis=1, mode="mirror")
    dy = ndimage.sobel(grey, axis=0, mode="mirror")
    values = {"x": np.abs(dx), "y": np.abs(dy), "magnitude": np.hypot(dx, dy)}[direction]
    expected = np.clip(np.rint(values), 0, 255)
    assert _maxdiff(_run("sobel", image, direction=direction)[:, :, 0], expected) <= (
        0 if direction != "magnitude" else 1
    )


def test_canny_finds_a_step_edge_and_nothing_on_flat() -> None:
    """Canny marks the boundary of a step and nothing on a flat image; output is 0 or max."""
    flat = np.full((32, 32, 3), 100, dtype=np.uint8)
    assert not _run("canny", flat).any()
    image = np.zeros((32, 32, 1), dtype=np.uint16)
    image[:, 16:] = 60000
    edges = _run("canny", image)[:, :, 0]
    assert set(np.unique(edges)) == {0, 65535}
    columns = np.flatnonzero(edges.any(axis=0))
    assert set(columns) <= {15, 16}
    assert edges[2:-2, columns].any(axis=1).all()


def test_threshold_binary_and_invert() -> None:
    """binary: x > value -> max; invert swaps; colour goes through BT.601 grey first."""
    image = noise(15, 17, 1, np.uint16, seed=8)
    out = _run("threshold", image, value=30000.5)[:, :, 0]
    assert np.array_equal(out, np.where(image[:, :, 0] > 30000.5, 65535, 0))
    inverted = _run("threshold", image, value=30000.5, invert=True)[:, :, 0]
    assert np.array_equal(inverted, 65535 - out)
    rgb = noise(15, 17, 3, seed=9)
    grey = (rgb.astype(np.int64) @ np.array(filter_math.BT601_WEIGHTS) + 16384) >> 15
    assert np.array_equal(_run("threshold", rgb, value=100.0)[:, :, 0], np.where(grey > 100, 255, 0))


def test_threshold_otsu_agrees_with_opencv_and_splits_modes() -> None:
    """Otsu picks OpenCV's level on 8-bit and separates a bimodal 16-bit image."""
    rng = np.random.default_rng(10)
    dark = rng.normal(60, 12, 500)
    bright = rng.normal(180, 20, 700)
    values = np.clip(np.concatenate([dark, bright]), 0, 255).astype(np.uint8).reshape(30, 40, 1)
    level, expected = cv2.threshold(values, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    assert cpu_filters.otsu_level(values) == int(level)
    assert np.array_equal(_run("threshold", values, method="otsu")[:, :, 0], expected)
    wide = values.astype(np.uint16) * 257
    level16 = cpu_filters.otsu_level(wide)
    assert 90 * 257 < level16 < 150 * 257


def test_threshold_adaptive_matches_opencv() -> None:
    """Adaptive (mean) equals cv2.adaptiveThreshold on 8-bit."""
    image = noise(40, 36, 1, seed=11)
    expected = cv2.adaptiveThreshold(image, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 11, 3)
    out = _run("threshold", image, method="adaptive", block_size=11, c=3)[:, :, 0]
    assert np.array_equal(out, expected)
    inverted = _run("threshold", image, method="adaptive", block_size=11, c=3, invert=True)[:, :, 0]
    assert np.array_equal(inverted, 255 - expected)


def test_threshold_adaptive_16_bit_formula() -> None:
    """16-bit adaptive: x > rounded window mean (edges repeated) - c."""
    image = noise(30, 26, 1, np.uint16, seed=14)
    mean = cv2.blur(image, (7, 7), borderType=cv2.BORDER_REPLICATE)
    expected = np.where(image[:, :, 0].astype(np.int64) > mean.astype(np.int64) - 100, 65535, 0)
    out = _run("threshold", image, method="adaptive", block_size=7, c=100)[:, :, 0]
    assert np.array_equal(out, expected)


@pytest.mark.parametrize(
    ("params", "shape"),
    [
        ({"scale": 0.5}, (20, 30)),
        ({"width": 15}, (10, 15)),
        ({"height": 80}, (80, 120)),
        ({"width": 30, "height": 30}, (20, 30)),
        ({"width": 30, "height": 30, "keep_aspect": False}, (30, 30)),
    ],
)
def test_resize_geometry(params: dict[str, Any], shape: tuple[int, int]) -> None:
    """Scale, one side, a box with aspect kept, and an exact size."""
    out = _run("resize", noise(40, 60, 3), **params)
    assert out.shape[:2] == shape


def test_resize_nearest_area_bilinear() -> None:
    """nearest picks floor(x * in/out); area 2x down is the 2x2 mean; bilinear keeps a flat image flat."""
    image = noise(40, 60, 3, seed=12)
    nearest = _run("resize", image, width=25, interpolation="nearest", keep_aspect=False, height=17)
    rows = np.floor(np.arange(17) * 40 / 17).astype(int)
    cols = np.floor(np.arange(25) * 60 / 25).astype(int)
    assert np.array_equal(nearest, image[rows][:, cols])
    area = _run("resize", image, scale=0.5, interpolation="area")
    blocks = image.reshape(20, 2, 30, 2, 3).astype(np.float64).mean(axis=(1, 3))
    assert _maxdiff(area, np.rint(blocks)) <= 1
    flat = np.full((10, 10, 1), 4242, dtype=np.uint16)
    assert np.array_equal(_run("resize", flat, scale=2.7), np.full((27, 27, 1), 4242, dtype=np.uint16))


def test_resize_too_large_is_rejected() -> None:
    """A resize beyond the pixel bound is refused in the plan (the backends no longer check sizes themselves),
    naming its parameter."""
    with pytest.raises(errors.PayloadTooLarge) as caught:
        filter_math.output_shapes(4000, 4000, 1, validate_pipeline([("resize", {"scale": 16.0})]), 50_000_000)
    assert caught.value.field_violations[0].field == "pipeline[0].params.scale"


@pytest.mark.parametrize(
    ("size", "params", "shape"),
    [
        ((1, 1000), {"width": 100}, (1, 100)),
        ((1, 7), {"width": 1}, (1, 1)),
        ((1000, 1), {"height": 100}, (100, 1)),
        ((1, 1000), {"width": 100, "height": 100}, (1, 100)),
        ((1, 1000), {"scale": 0.1}, (1, 100)),
    ],
)
def test_resize_of_a_thin_image_keeps_a_derived_side_of_at_least_one_pixel(
    size: tuple[int, int], params: dict[str, Any], shape: tuple[int, int]
) -> None:
    """A side derived from the other (or from scale or the aspect ratio) that rounds to 0 is 1 pixel: a
    1000x1 image resized to width 100 is 100x1. It was refused as "gives an empty image (100x0)"."""
    out = _run("resize", noise(*size, 3), **params)
    assert out.shape == (*shape, 3)
    assert filter_math.resize_shape(*size, step("resize", **params)) == shape


def test_resize_too_large_from_height_alone_names_height() -> None:
    """When only height was set, the error names params.height, the one the client gave (it named width)."""
    with pytest.raises(errors.PayloadTooLarge) as caught:
        filter_math.output_shapes(1, 1000, 1, validate_pipeline([("resize", {"height": 16384})]), 50_000_000)
    assert [v.field for v in caught.value.field_violations] == ["pipeline[0].params.height"]
    assert "16384000x16384" in caught.value.message


def test_crop_and_its_bounds() -> None:
    """crop is a slice; a rectangle outside the image names the offending field."""
    image = noise(20, 30, 3)
    assert np.array_equal(_run("crop", image, x=5, y=4, width=10, height=6), image[4:10, 5:15])
    assert np.array_equal(_run("crop", image, x=25, y=15), image[15:, 25:])
    with pytest.raises(errors.InvalidArgument) as caught:
        _run("crop", image, x=25, width=10)
    assert caught.value.field_violations[0].field == "pipeline[0].params.width"
    with pytest.raises(errors.InvalidArgument) as caught:
        _run("crop", image, y=20)
    assert caught.value.field_violations[0].field == "pipeline[0].params.y"


def test_rotate_right_angles_are_exact() -> None:
    """90, 180, 270, -90 and 360 degrees equal np.rot90; positive angles turn counter-clockwise."""
    image = noise(7, 11, 3)
    for angle, turns in ((90.0, 1), (180.0, 2), (270.0, 3), (-90.0, 3), (360.0, 0)):
        assert np.array_equal(_run("rotate", image, angle=angle), np.rot90(image, turns)), angle


@pytest.mark.parametrize("angle", [90.0, -90.0, 270.0])
def test_a_quarter_turn_without_expand_keeps_the_canvas(angle: float) -> None:
    """expand=false keeps a non-square image's canvas at a quarter turn too (cropped and filled, as at 89.999
    degrees); the transposition swapped its sides. A square image turns exactly, and 180 degrees stays exact."""
    image = noise(20, 40, 3)
    kept = _run("rotate", image, angle=angle, expand=False)
    assert kept.shape == image.shape
    assert kept.shape == _run("rotate", image, angle=angle - 0.001, expand=False).shape
    assert not kept[:, :10].any()  # the turned image is 20 wide on the 40-wide canvas
    square = noise(9, 9, 1)
    turns = round(angle / 90) % 4
    assert np.array_equal(_run("rotate", square, angle=angle, expand=False), np.rot90(square, turns))
    assert np.array_equal(_run("rotate", image, angle=180.0, expand=False), np.rot90(image, 2))


def test_rotate_arbitrary_angle() -> None:
    """45 degrees with expand holds the whole image; the centre pixel is kept; corners are filled with 0."""
    image = np.full((21, 21, 1), 200, dtype=np.uint8)
    out = _run("rotate", image, angle=45.0)
    assert out.shape[:2] == (30, 30)
    assert out[15, 15, 0] == 200
    assert out[0, 0, 0] == 0
    same = _run("rotate", image, angle=45.0, expand=False)
    assert same.shape == image.shape


@pytest.mark.parametrize(("direction", "axes"), [("horizontal", (1,)), ("vertical", (0,)), ("both", (0, 1))])
def test_flip(direction: str, axes: tuple[int, ...]) -> None:
    """flip mirrors the named axes."""
    image = noise(5, 6, 4, np.uint16)
    assert np.array_equal(_run("flip", image, direction=direction), np.flip(image, axes))


def test_equalize_global_matches_opencv_and_spans_16_bit_range() -> None:
    """Global equalisation equals cv2.equalizeHist per channel (8-bit) and spreads 16-bit to full range."""
    image = (noise(30, 30, 3, seed=13) // 4 + 60).astype(np.uint8)
    out = _run("equalize", image)
    for c in range(3):
        assert np.array_equal(out[:, :, c], cv2.equalizeHist(np.ascontiguousarray(image[:, :, c])))
    wide = image[:, :, :1].astype(np.uint16) * 100
    eq = _run("equalize", wide)[:, :, 0]
    assert eq.max() == 65535
    order = np.argsort(wide.ravel(), kind="stable")
    assert np.all(np.diff(eq.ravel()[order].astype(np.int64)) >= 0)


def test_equalize_clahe_raises_local_contrast() -> None:
    """CLAHE increases the spread of a low-contrast image and keeps alpha."""
    image = (smooth(64, 64, 4) // 8 + 100).astype(np.uint8)
    out = _run("equalize", image, method="clahe", clip_limit=4.0, tiles=4)
    assert out[:, :, :3].std() > image[:, :, :3].std() * 1.5
    assert np.array_equal(out[:, :, 3], image[:, :, 3])


def test_convert_color_hsv() -> None:
    """Pure red, green and blue map to full-range hues 0, 85, 171; HSV round-trips within 1 LSB (8-bit)."""
    colours = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128]]], dtype=np.uint8)
    hsv = _run("convert_color", colours)
    assert hsv[0, :, 0].tolist()[:3] == [0, 85, 171]
    assert hsv[0, :3, 1].tolist() == [255, 255, 255]
    assert hsv[0, 3].tolist() == [0, 0, 128]
    image = smooth(16, 16, 3)
    back = _run("convert_color", _run("convert_color", image), conversion="hsv_to_rgb")
    assert _maxdiff(back, image) <= 3
    wide = smooth(16, 16, 3, np.uint16)
    back16 = _run("convert_color", _run("convert_color", wide), conversion="hsv_to_rgb")
    assert _maxdiff(back16, wide) <= 2
    swapped = _run("convert_color", noise(4, 4, 4), conversion="rgb_to_bgr")
    assert swapped.shape[2] == 4


def test_pipeline_composes_in_order_with_timings() -> None:
    """A pipeline runs its steps in order on the backend and reports a timing per step."""
    image = smooth(48, 64, 3)
    steps = validate_pipeline(
        [("grayscale", {}), ("gaussian_blur", {"sigma": 2.0}), ("threshold", {"method": "otsu"})]
    )
    output = run_pipeline(CpuBackend(), image, steps)
    manual = image
    for one in steps:
        manual = cpu_filters.apply(manual, one)
    assert np.array_equal(output.image, manual)
    assert output.image.shape == (48, 64, 1)
    assert [name for name, _ in output.timings] == ["grayscale", "gaussian_blur", "threshold"]
    assert all(seconds >= 0 for _, seconds in output.timings)
