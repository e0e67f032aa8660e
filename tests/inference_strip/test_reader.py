"""Reader invariants: no strip is never POSITIVE/NEGATIVE, input forms, geometry, pre-check, batching."""

from __future__ import annotations

import contextlib
import importlib
import math
import types
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from mesh.kit.devices import gpu_available
from mesh.services.inference.strip import StripReader
from mesh.services.inference.strip.backend import ArrayBackend, CpuBackend, numpy_array_backend
from mesh.services.inference.strip.generator import GeneratorOptions, Overrides, generate, generate_with
from mesh.services.inference.strip.types import QualityFlag, Verdict

READER = StripReader()


def _positive(seed: int = 101, **fixed: object) -> npt.NDArray[Any]:
    overrides = Overrides(cls="positive", kind="cassette", t_contrast=0.3, c_contrast=0.6, image_format="png")
    for key, value in fixed.items():
        overrides = Overrides(**{**overrides.__dict__, key: value})
    return generate_with(seed, overrides, GeneratorOptions(size=(640, 480))).image


@pytest.mark.parametrize(
    "image",
    [
        np.full((480, 640, 3), 200, np.uint8),
        np.zeros((240, 320), np.uint8),
        np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8),
        np.full((300, 400, 4), 255, np.uint8),
    ],
    ids=["uniform_grey", "black", "noise", "white_rgba"],
)
def test_no_strip_is_invalid_with_strip_not_found(image: npt.NDArray[Any]) -> None:
    """Pictures without any strip are INVALID, flagged STRIP_NOT_FOUND, with no window and no lines."""
    reading = READER.read(image)
    assert reading.verdict is Verdict.INVALID
    assert QualityFlag.STRIP_NOT_FOUND in reading.quality_flags
    assert reading.window is None
    assert not reading.control_line.present
    assert not reading.test_line.present


def test_never_a_verdict_without_a_strip_on_generated_images() -> None:
    """Over generated images, every reading flagged STRIP_NOT_FOUND is INVALID."""
    for seed in range(1_000_000, 1_000_030):
        reading = READER.read(generate(seed).image)
        if QualityFlag.STRIP_NOT_FOUND in reading.quality_flags:
            assert reading.verdict is Verdict.INVALID


def test_a_squat_object_without_a_cassette_window_is_not_read_as_a_bare_strip() -> None:
    """A pale ellipse crossed by a dark stroke is no test: too squat for a bare strip and without a cassette's
    window, it is INVALID with STRIP_NOT_FOUND (its stroke was read as C, and the picture as NEGATIVE)."""
    image = np.full((480, 640, 3), 70, np.uint8)
    cv2.ellipse(image, (320, 240), (170, 60), -8, 0, 360, (245, 215, 228), -1)
    cv2.line(image, (285, 140), (270, 340), (60, 50, 45), 9)
    reading = READER.read(cv2.GaussianBlur(image, (0, 0), 1.2))
    assert reading.verdict is Verdict.INVALID
    assert reading.quality_flags == (QualityFlag.STRIP_NOT_FOUND,)


def test_a_thin_bare_strip_is_still_read() -> None:
    """The squatness rule leaves bare strips alone: a generated negative bare strip reads NEGATIVE."""
    overrides = Overrides(cls="negative", kind="strip", c_contrast=0.6, image_format="png")
    reading = READER.read(generate_with(7, overrides, GeneratorOptions(size=(640, 480))).image)
    assert reading.verdict is Verdict.NEGATIVE


def test_a_bare_strip_beside_a_larger_squat_box_is_read() -> None:
    """A brown box larger than the bare strip beside it is the most strip-like object, but too squat for a bare
    strip and without a cassette's window: the reader goes on to the next object, the strip, and reads it
    (train seed 866 read INVALID with STRIP_NOT_FOUND)."""
    overrides = Overrides(cls="negative", kind="strip", c_contrast=0.6, image_format="png")
    image = generate_with(7, overrides, GeneratorOptions(size=(640, 480))).image.copy()
    box = cv2.boxPoints(((170, 400), (260, 90), -5.0))
    cv2.fillConvexPoly(image, np.round(box).astype(np.int32), (150, 120, 95), cv2.LINE_AA)
    reading = READER.read(image)
    assert reading.verdict is Verdict.NEGATIVE
    assert reading.window is not None
    assert abs(reading.window.center_x - 382) < 10
    assert abs(reading.window.center_y - 265) < 10


def test_input_forms_agree() -> None:
    """RGB, opaque RGBA, uint16 and a trailing single channel give the same reading."""
    rgb = _positive()
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=2)
    wide = rgb.astype(np.uint16) * 257
    base = READER.read(rgb)
    assert base.verdict is Verdict.POSITIVE
    assert READER.read(rgba) == base
    assert READER.read(wide) == base
    grey = (rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
    assert READER.read(grey).verdict is Verdict.POSITIVE
    assert READER.read(grey[:, :, None]).verdict is Verdict.POSITIVE


def test_transparent_pixels_are_read_as_black_whatever_colour_they_hold() -> None:
    """RGBA is read as it looks over black: a photo made wholly transparent shows no strip (its colours were read
    as opaque and it read POSITIVE), and a cut-out strip on a transparent white ground reads as the photo does
    on black."""
    rgb = _positive()
    clear = np.concatenate([rgb, np.zeros((*rgb.shape[:2], 1), np.uint8)], axis=2)
    hidden = READER.read(clear)
    assert hidden.verdict is Verdict.INVALID
    assert QualityFlag.STRIP_NOT_FOUND in hidden.quality_flags

    strip = READER.read(rgb).window
    assert strip is not None
    rows = slice(round(strip.center_y) - 100, round(strip.center_y) + 100)  # the cassette and some table
    white = np.full((*rgb.shape[:2], 4), 255, np.uint8)
    white[:, :, 3] = 0
    white[rows, :, :3] = rgb[rows]
    white[rows, :, 3] = 255
    on_black = np.zeros_like(rgb)
    on_black[rows] = rgb[rows]
    cut_out = READER.read(on_black)
    assert cut_out.verdict is Verdict.POSITIVE
    assert READER.read(white) == cut_out


@pytest.mark.parametrize(
    "bad",
    [np.zeros((10, 10, 3), np.uint8), np.zeros((100, 100, 2), np.uint8), np.zeros((100, 100), np.float32)],
    ids=["tiny", "two_channels", "float"],
)
def test_unreadable_inputs_raise_value_error(bad: npt.NDArray[Any]) -> None:
    """Shapes and types the reader cannot take are refused with ValueError (the service maps it to 400)."""
    with pytest.raises(ValueError, match=r"."):
        READER.read(bad)


def test_geometry_matches_the_truth() -> None:
    """Window angle, C and T centres land near the generator's truth, in input-image pixels."""
    sample = generate_with(
        202,
        Overrides(
            cls="positive", kind="cassette", t_contrast=0.4, c_contrast=0.6, angle=10.0, image_format="png"
        ),
        GeneratorOptions(size=(800, 600)),
    )
    truth = sample.truth
    reading = READER.read(sample.image)
    assert reading.verdict is Verdict.POSITIVE
    assert reading.window is not None
    assert truth.window is not None
    assert abs(reading.window.angle_degrees - truth.window.angle_degrees) < 2.0
    tolerance = 0.05 * truth.window.length + 2
    for found, true in ((reading.control_line, truth.control_line), (reading.test_line, truth.test_line)):
        assert math.hypot(found.center_x - true.center_x, found.center_y - true.center_y) < tolerance
        assert abs(found.position - true.position) < 0.06
    assert reading.test_line.position < reading.control_line.position


def test_ratio_follows_test_line_strength() -> None:
    """A stronger T (same scene) gives a higher t_to_c_ratio."""
    ratios = [READER.read(_positive(seed=303, t_contrast=t)).t_to_c_ratio for t in (0.08, 0.2, 0.5)]
    assert ratios[0] < ratios[1] < ratios[2]


def test_negative_and_invalid_readings() -> None:
    """C only is NEGATIVE with ratio 0; no C is INVALID with NO_CONTROL_LINE, even with a strong T."""
    negative = READER.read(_positive(seed=404, cls="negative", t_contrast=0.0))
    assert negative.verdict is Verdict.NEGATIVE
    assert negative.t_to_c_ratio == 0.0
    invalid = READER.read(_positive(seed=405, cls="invalid", c_contrast=0.0, t_contrast=0.5))
    assert invalid.verdict is Verdict.INVALID
    assert QualityFlag.NO_CONTROL_LINE in invalid.quality_flags
    assert invalid.window is not None


def test_confidence_is_a_probability() -> None:
    """Confidence lies in [0, 1]; a clear positive is confident."""
    reading = READER.read(_positive())
    assert 0.0 <= reading.confidence <= 1.0
    assert reading.confidence > 0.8


def test_precheck_is_marked_and_quick_to_judge() -> None:
    """The pre-check answers precheck_only=True and sees the control line of a clear test."""
    reading = READER.precheck(_positive())
    assert reading.precheck_only
    assert reading.control_line.present
    assert QualityFlag.NO_CONTROL_LINE not in reading.quality_flags


def test_underexposed_image_is_flagged() -> None:
    """A very dark photo of a strip is flagged UNDEREXPOSED."""
    dark = (_positive().astype(np.float32) * 0.15).astype(np.uint8)
    reading = READER.read(dark)
    if QualityFlag.STRIP_NOT_FOUND not in reading.quality_flags:
        assert QualityFlag.UNDEREXPOSED in reading.quality_flags


def test_heavy_blur_is_flagged() -> None:
    """Defocus far beyond the specification is flagged BLUR."""
    import cv2

    blurred = cv2.GaussianBlur(_positive(), (0, 0), 9.0)
    reading = READER.read(blurred)
    assert QualityFlag.BLUR in reading.quality_flags or QualityFlag.STRIP_NOT_FOUND in reading.quality_flags


def test_read_batch_equals_single_reads() -> None:
    """read_batch returns one reading per image, in order, equal to read()."""
    images = [_positive(seed=s) for s in (1, 2)] + [np.full((240, 320, 3), 90, np.uint8)]
    assert READER.read_batch(images) == [READER.read(image) for image in images]
    assert READER.read_batch([]) == []


def test_array_backend_matches_opencv_backend() -> None:
    """The GPU code path (run here by NumPy/SciPy) gives the same verdicts as the OpenCV path."""
    array_reader = StripReader()
    array_reader.backend = numpy_array_backend()
    for seed in range(1_000_000, 1_000_012):
        image = generate(seed).image
        assert array_reader.read(image).verdict is READER.read(image).verdict


def test_array_backend_downscale_equals_opencv() -> None:
    """Box downscaling by an integer factor (halvings, then an odd rest) is bit-identical between the two
    backends."""
    image = np.random.default_rng(5).integers(0, 256, (123, 157, 3), dtype=np.uint8)
    for factor in (2, 3, 4, 6, 8):
        assert np.array_equal(
            CpuBackend().downscale(image, factor), numpy_array_backend().downscale(image, factor)
        )


@pytest.mark.skipif(gpu_available()[0], reason="a GPU is present")
def test_gpu_device_without_cupy_is_refused() -> None:
    """Asking for the GPU reader where CuPy sees no device raises RuntimeError at construction."""
    with pytest.raises(RuntimeError, match="CuPy"):
        StripReader(device="gpu")


def test_gpu_backend_uploads_each_image_once_per_thread() -> None:
    """The GPU path (here on emulated CuPy) uploads an image once for its downscale and its crop, and a new
    image again; what lands on the device is the image."""
    from scipy import ndimage

    from mesh.services.inference.strip.backend import ArrayBackend
    from tests.image_processing import fake_cupy

    cupy = fake_cupy.build()["cupy"]
    backend = ArrayBackend(cupy, ndimage, "gpu")
    first = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    second = first.copy()
    on_device = backend._device_image(first)
    assert backend._device_image(first) is on_device
    assert np.array_equal(np.asarray(on_device), first)
    assert backend._device_image(second) is not on_device


@pytest.mark.parametrize("shape", [(16, 8193, 3), (8193, 16), (39, 20000, 3)])
def test_a_long_sliver_is_no_strip_not_a_crash(shape: tuple[int, ...]) -> None:
    """An image whose short side downscales to under a few working pixels (16x8193) is INVALID with
    STRIP_NOT_FOUND, read and pre-checked; it crashed in the downscale (INTERNAL through the service)."""
    reader = StripReader()
    for reading in (
        reader.read(np.full(shape, 255, np.uint8)),
        reader.precheck(np.full(shape, 255, np.uint8)),
    ):
        assert reading.verdict is Verdict.INVALID
        assert QualityFlag.STRIP_NOT_FOUND in reading.quality_flags


class _DeviceArray(np.ndarray):
    """A host array with the one transfer method the GPU path uses."""

    def set(self, array: npt.NDArray[Any]) -> None:
        self[...] = array


def _device_stand_in() -> types.ModuleType:
    """NumPy posing as CuPy, so that the GPU path's upload cache runs (with NumPy itself it is bypassed)."""
    module = types.ModuleType("device_stand_in")
    for name in dir(np):
        with contextlib.suppress(AttributeError, TypeError):
            setattr(module, name, getattr(np, name))
    module.empty = lambda shape, dtype: np.empty(shape, dtype).view(_DeviceArray)  # type: ignore[attr-defined]
    module.asnumpy = np.asarray  # type: ignore[attr-defined]
    module.cuda = types.SimpleNamespace(alloc_pinned_memory=bytearray)  # type: ignore[attr-defined]
    return module


def test_the_gpu_path_reads_a_refilled_frame_anew() -> None:
    """A caller that refills one frame buffer between readings (a camera loop) gets the new frame read: the GPU
    path reused its last upload for the same array, so a black frame after a positive one read POSITIVE."""
    reader = StripReader()
    reader.backend = ArrayBackend(_device_stand_in(), importlib.import_module("scipy.ndimage"), "gpu")
    frame = _positive()
    assert reader.read(frame).verdict is Verdict.POSITIVE
    frame[...] = 0
    reading = reader.read(frame)
    assert reading.verdict is Verdict.INVALID
    assert QualityFlag.STRIP_NOT_FOUND in reading.quality_flags
