"""The filter catalogue: every filter's typed parameters, output channels, devices and CPU/GPU tolerance.

Both backends implement exactly these names; :func:`validate_pipeline` turns a request's steps into
:class:`Step` objects with every parameter checked and defaulted, or raises ``InvalidArgument`` naming each
bad field (``pipeline[1].params.sigma``) and its allowed range.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from mesh.common.v1 import params_pb2
from mesh.kit import errors
from mesh.kit.cpus import usable_cpus
from mesh.kit.param_values import ParamScalar, param_value
from mesh.kit.text_fields import shown
from mesh.services.image_processing.params import (
    ParamSpec,
    Violation,
    bool_param,
    enum_param,
    float_param,
    int_param,
)

MAX_PIPELINE_STEPS = 32
BORDERS = ("reflect", "clamp", "wrap", "constant")
GRAY_METHODS = ("bt601", "bt709", "average", "lightness", "luminosity")


class Device(StrEnum):
    """A compute backend (mirrors ``mesh.common.v1.Device``)."""

    CPU = "cpu"
    GPU = "gpu"


@dataclass(frozen=True)
class Tolerance:
    """How far the GPU result may differ from the CPU result for the same input.

    ``max_abs_diff`` is in least significant bits of the sample type; ``fraction`` is the share of samples
    that must lie within it (1.0: all of them).
    """

    max_abs_diff: int
    fraction: float = 1.0
    note: str = ""
    max_abs_diff_16bit: int | None = None
    """A looser bound for 16-bit samples, where it differs."""
    fraction_16bit: float | None = None
    """The share of 16-bit samples within their bound, where it differs."""

    def limit(self, sample_bits: int) -> tuple[int, float]:
        """The bound and the share of samples within it, for samples of ``sample_bits`` bits."""
        if sample_bits == 16:
            return (
                self.max_abs_diff if self.max_abs_diff_16bit is None else self.max_abs_diff_16bit,
                self.fraction if self.fraction_16bit is None else self.fraction_16bit,
            )
        return self.max_abs_diff, self.fraction

    def describe(self) -> str:
        base = _bound(self.max_abs_diff, self.fraction)
        if self.max_abs_diff_16bit is not None or self.fraction_16bit is not None:
            base += "; 16-bit: " + _bound(*self.limit(16))
        return f"{base} ({self.note})" if self.note else base


def _bound(max_abs_diff: int, fraction: float) -> str:
    text = "exact" if max_abs_diff == 0 else f"within {max_abs_diff} LSB"
    return text if fraction >= 1.0 else f"{text} on {fraction:.1%} of samples"


EXACT = Tolerance(0)
ONE_LSB = Tolerance(1)


@dataclass(frozen=True)
class Step:
    """One validated pipeline step: its filter, its position and every parameter (defaults filled in)."""

    filter: str
    index: int
    params: Mapping[str, ParamScalar]

    def field(self, param: str) -> str:
        """The request field path of one of this step's parameters."""
        return f"pipeline[{self.index}].params.{param}"

    def as_int(self, name: str) -> int:
        value = self.params[name]
        assert isinstance(value, int)
        return value

    def as_float(self, name: str) -> float:
        value = self.params[name]
        assert isinstance(value, int | float)
        return float(value)

    def as_str(self, name: str) -> str:
        value = self.params[name]
        assert isinstance(value, str)
        return value

    def as_bool(self, name: str) -> bool:
        value = self.params[name]
        assert isinstance(value, bool)
        return value

    def invalid(self, param: str, description: str) -> errors.InvalidArgument:
        """An InvalidArgument naming this step's parameter (for checks that need the image)."""
        where = self.field(param)
        return errors.InvalidArgument(
            f"{where} {description}", field_violations=[errors.FieldViolation(where, description)]
        )


CrossCheck = Callable[[Mapping[str, ParamScalar]], list[tuple[str, str]]]
Shape = tuple[int, int, int]
"""(height, width, channels) of an image."""


@dataclass(frozen=True)
class StepImages:
    """The images of one step, as planned before it runs: what a filter's working memory is worked out from."""

    before: Shape
    after: Shape
    itemsize: int
    """Bytes per sample (1 or 2), the same before and after."""

    @property
    def pixels(self) -> int:
        """Pixels of the input."""
        return self.before[0] * self.before[1]

    @property
    def plane(self) -> int:
        """Bytes of one channel of the input (a grey image of its size)."""
        return self.pixels * self.itemsize

    @property
    def input_bytes(self) -> int:
        return self.plane * self.before[2]

    @property
    def output_bytes(self) -> int:
        height, width, channels = self.after
        return height * width * channels * self.itemsize


WorkingMemory = Callable[[Step, StepImages], int]
"""Bytes a filter's CPU code holds at its peak besides the step's input and output: its temporaries (a float copy,
a padded copy, a mask, OpenCV's row buffers). Admission weighs a step as input + output + this; each model
follows what its function in ``cpu_filters`` allocates, and ``tests/image_processing/test_step_memory.py``
holds it against the measured peak of every filter."""


def no_working_memory(step: Step, images: StepImages) -> int:
    """A filter that writes its output and nothing else (OpenCV's own buffers of a few kilobytes aside)."""
    return 0


@dataclass(frozen=True)
class FilterDefinition:
    """One filter of the catalogue."""

    name: str
    description: str
    params: tuple[ParamSpec, ...]
    output_channels: str
    tolerance: Tolerance
    gpu: bool = True
    """Whether the GPU backend runs it on the device (otherwise that step runs on the host CPU)."""
    check: CrossCheck | None = field(default=None, compare=False)
    """Checks between parameters; returns (param, problem) pairs."""
    working_memory: WorkingMemory = field(default=no_working_memory, compare=False)
    """Its CPU code's temporaries (see :data:`WorkingMemory`)."""

    @property
    def devices(self) -> tuple[Device, ...]:
        return (Device.CPU, Device.GPU) if self.gpu else (Device.CPU,)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


def _border(default: str = "reflect") -> ParamSpec:
    return enum_param(
        "border",
        default,
        "How pixels beyond the edge are read: reflect (mirror without repeating the edge), clamp "
        "(repeat the edge), wrap (tile), constant (zero).",
        BORDERS,
    )


def _check_canny(p: Mapping[str, ParamScalar]) -> list[tuple[str, str]]:
    low, high = p["low"], p["high"]
    assert isinstance(low, float)
    assert isinstance(high, float)
    return [("low", f"must be <= high ({high:g}), got {low:g}")] if low > high else []


def _check_resize(p: Mapping[str, ParamScalar]) -> list[tuple[str, str]]:
    if p["scale"] == 0 and p["width"] == 0 and p["height"] == 0:
        return [("width", "set width and/or height, or scale")]
    return []


def gaussian_ksize(sigma: float, ksize: int) -> int:
    """The kernel size used for ``sigma`` when the request leaves it 0."""
    return ksize if ksize else 2 * math.ceil(3 * sigma) + 1


# --- working memory (see WorkingMemory) ----------------------------------------------------------------
FLOAT_BYTES = 4
INDEX_BYTES = 8
"""NumPy's ``take`` and ``bincount`` turn 16-bit samples into 8-byte indices first."""


@functools.cache
def opencv_threads() -> int:
    """Threads OpenCV splits a filter between (its default, the cores this process may use): some filters hold
    buffers per thread."""
    return usable_cpus()


def _blur_rows(images: StepImages, ksize: int, width: int) -> int:
    """OpenCV's Gaussian: per thread, a ring of ``ksize`` rows of fixed-point sums (2 bytes a sample at 8 bits,
    4 at 16)."""
    return opencv_threads() * ksize * (width + ksize) * images.before[2] * 2 * images.itemsize


def _box_rows(images: StepImages, ksize: int, width: int, channels: int = 0) -> int:
    """OpenCV's box filter: one ring of ``ksize`` + 3 rows of 32-bit sums (it does not split the image)."""
    return (ksize + 3) * (width + ksize) * (channels or images.before[2]) * 4


def _bordered(step: Step, images: StepImages, ksize: int, rows: Callable[[StepImages, int, int], int]) -> int:
    """A blur's rows; with a wrap border (``cpu_filters._with_border``) the padded input and the padded result
    besides, the output then cut from the latter."""
    height, width, channels = images.before
    if step.as_str("border") != "wrap":
        return rows(images, ksize, width)
    radius = ksize // 2
    padded = (height + 2 * radius) * (width + 2 * radius) * channels * images.itemsize
    return 2 * padded + rows(images, ksize, width + 2 * radius)


def _gaussian_memory(step: Step, images: StepImages) -> int:
    ksize = gaussian_ksize(step.as_float("sigma"), step.as_int("ksize"))
    return _bordered(step, images, ksize, _blur_rows)


def _box_memory(step: Step, images: StepImages) -> int:
    return _bordered(step, images, step.as_int("ksize"), _box_rows)


def _unsharp_memory(step: Step, images: StepImages) -> int:
    """The blurred copy (with the blur's rows while it is made), then the sharpened one (the output, without a
    threshold); with a threshold their difference and its boolean mask besides, and then the output chosen
    from them."""
    ksize = gaussian_ksize(step.as_float("sigma"), 0)
    blurred = images.input_bytes + _blur_rows(images, ksize, images.before[1])
    sharpened = 2 * images.input_bytes
    if step.as_int("threshold"):
        sharpened += images.input_bytes + images.pixels * images.before[2]
    return max(blurred, sharpened) - images.output_bytes


def _grayscale_memory(step: Step, images: StepImages) -> int:
    """``lightness`` takes the maximum and the minimum of the colour channels as two grey planes first."""
    return 2 * images.plane if images.before[2] > 1 and step.as_str("method") == "lightness" else 0


def _sobel_memory(step: Step, images: StepImages) -> int:
    """float32 derivatives: one for x or y, two for the magnitude (computed into the first); then the first
    beside the output made from it."""
    floats = images.pixels * images.before[2] * FLOAT_BYTES
    derivatives = 2 * floats if step.as_str("direction") == "magnitude" else floats
    return max(derivatives, floats + images.output_bytes) - images.output_bytes


def _grey_copy(images: StepImages) -> int:
    """The BT.601 grey image that the one-channel filters (Canny, threshold) work on: the input itself when it is grey."""
    return images.plane if images.before[2] > 1 else 0


CANNY_BYTES_PER_PIXEL = 8
"""OpenCV's Canny: 16-bit x and y derivatives, the edge map, and its threads' stacks of candidate edges (7.1
bytes a pixel measured on 2 threads)."""


def _canny_memory(step: Step, images: StepImages) -> int:
    """The grey copy and, at 16 bits, its 8-bit reduction, beside OpenCV's own arrays and the 8-bit edges, then
    the edges widened to 16 bits (twice: ``astype`` and the product) when the output is made."""
    pixels = images.pixels
    held = _grey_copy(images) + (pixels if images.itemsize == 2 else 0)
    canny = CANNY_BYTES_PER_PIXEL * pixels + pixels
    widened = pixels + 4 * pixels if images.itemsize == 2 else 0
    return max(held + canny, held + widened) - images.output_bytes


def _threshold_memory(step: Step, images: StepImages) -> int:
    """The grey copy; Otsu at 16 bits counts the samples through a 64-bit copy of them; adaptive takes the
    window mean with the box filter's rows (OpenCV's 8-bit one into the output), and at 16 bits holds the mean
    and compares through three 32-bit arrays and a boolean mask, then makes the output through a 64-bit
    product of that mask."""
    grey, output = _grey_copy(images), images.output_bytes
    method, pixels = step.as_str("method"), images.pixels
    if method == "otsu" and images.itemsize == 2:
        return grey + max(INDEX_BYTES * pixels - output, 0)
    if method != "adaptive":
        return grey
    rows = _box_rows(images, step.as_int("block_size"), images.before[1], 1)
    if images.itemsize == 1:
        return grey + rows
    compared = 3 * 4 * pixels + pixels
    multiplied = pixels + INDEX_BYTES * pixels + output
    return grey + images.plane + max(rows, compared - output, multiplied - output)


def _adjust_memory(step: Step, images: StepImages) -> int:
    """A lookup table at 16 bits is ``np.take``, which makes 64-bit indices of every sample."""
    return INDEX_BYTES * images.pixels * images.before[2] if images.itemsize == 2 else 0


def _equalize_memory(step: Step, images: StepImages) -> int:
    """``cv2.split``'s copy of every channel and the new colour planes, made before the old ones go, with the
    work of one plane (at 16 bits the 64-bit indices of ``np.take``), then the planes merged into the output.
    CLAHE keeps its tables (a row of every possible sample value per tile) and, where the tiles do not divide
    the sides, a padded plane, until the object goes, after the merge."""
    height, width, channels = images.before
    planes = images.input_bytes
    colours = images.plane * min(channels, 3)
    kept = 0
    if step.as_str("method") == "clahe":
        tiles = step.as_int("tiles")
        tables = tiles * tiles * (1 << (8 * images.itemsize)) * images.itemsize
        padded = -(-height // tiles) * tiles * -(-width // tiles) * tiles * images.itemsize
        kept = tables + (padded if height % tiles or width % tiles else 0)
        one_plane = 0
    else:
        one_plane = INDEX_BYTES * images.pixels if images.itemsize == 2 else 0
    peak = kept + max(planes + colours + one_plane, planes + images.output_bytes)
    return peak - images.output_bytes


def _convert_memory(step: Step, images: StepImages) -> int:
    """The colour channels of an RGBA image are converted on their own (a contiguous copy of them, a
    three-channel result that alpha then joins); 16-bit HSV goes through float32 (the scaled input and the
    converted image, then the latter beside the 16-bit result)."""
    rgb, output = 3 * images.plane, images.output_bytes
    with_alpha = images.before[2] == 4
    copy = rgb if with_alpha and step.as_str("conversion") != "rgb_to_bgr" else 0
    converted = rgb if with_alpha else output
    phases = [copy + converted]
    if images.itemsize == 2 and step.as_str("conversion") != "rgb_to_bgr":
        floats = 3 * images.pixels * FLOAT_BYTES
        phases += [copy + 2 * floats, copy + floats + converted]
    if with_alpha:
        phases.append(converted + output)
    return max(phases) - output


FILTERS: dict[str, FilterDefinition] = {
    f.name: f
    for f in (
        FilterDefinition(
            "grayscale",
            "Converts to one grey channel (alpha is dropped). bt601 is OpenCV's cvtColor (15-bit fixed point, "
            "half up); bt709 and luminosity use 14-bit fixed-point weights rounded half to even.",
            (
                enum_param(
                    "method",
                    "bt601",
                    "bt601 (0.299 R + 0.587 G + 0.114 B), bt709 (0.2126, 0.7152, 0.0722), average, "
                    "lightness ((max + min) / 2), luminosity (0.21, 0.72, 0.07).",
                    GRAY_METHODS,
                ),
            ),
            "1",
            Tolerance(
                0, note="16-bit bt709 and luminosity go through float on the CPU", max_abs_diff_16bit=1
            ),
            working_memory=_grayscale_memory,
        ),
        FilterDefinition(
            "gaussian_blur",
            "Separable Gaussian blur of every channel.",
            (
                float_param("sigma", 1.0, "Standard deviation in pixels.", min=0.1, max=20.0),
                # 0 or odd: min, max and step cannot say it (step 2 from 1 would put the default, 0, out of
                # range and the web page's form would refuse it), so the description does, for every client.
                int_param(
                    "ksize",
                    0,
                    "Kernel size: 0, which derives it from sigma as 2 * ceil(3 * sigma) + 1, or an odd number"
                    " from 1 to 129 (even sizes are refused).",
                    min=0,
                    max=129,
                ),
                _border(),
            ),
            "same",
            Tolerance(
                1,
                0.999,
                "float32 taps on the GPU, OpenCV's fixed-point ones on the CPU: on noise up to 2 LSB on"
                " a few samples in 10,000",
            ),
            check=lambda p: (
                [("ksize", f"must be 0 or odd, got {p['ksize']}")]
                if isinstance(p["ksize"], int) and p["ksize"] and p["ksize"] % 2 == 0
                else []
            ),
            working_memory=_gaussian_memory,
        ),
        FilterDefinition(
            "box_blur",
            "Mean over a square window, every channel.",
            (int_param("ksize", 3, "Window size (odd).", min=1, max=129, step=2), _border()),
            "same",
            ONE_LSB,
            working_memory=_box_memory,
        ),
        FilterDefinition(
            "median",
            "Median over a square window, every channel; edges repeat.",
            (int_param("ksize", 3, "Window size: 3 or 5.", min=3, max=5, step=2),),
            "same",
            EXACT,
        ),
        FilterDefinition(
            "unsharp_mask",
            "Sharpens: image + amount * (image - gaussian_blur(image)) where the difference reaches threshold.",
            (
                float_param("sigma", 1.0, "Blur standard deviation in pixels.", min=0.1, max=20.0),
                float_param("amount", 1.0, "Strength of the sharpening.", min=0.0, max=5.0),
                int_param("threshold", 0, "Minimum difference that is sharpened.", min=0, max=65535),
            ),
            "same",
            # The backends' blurs round differently (OpenCV's fixed-point taps, float32 on the device), so
            # with a threshold a pixel whose difference from the blur lies at it may be sharpened on one
            # only, by about threshold x amount: on 8-bit noise 99.88 % of samples stayed within 2 LSB at
            # threshold 8 (emulated CuPy), all of them without a threshold.
            Tolerance(
                2,
                fraction=0.995,
                note="blur rounding is amplified by amount; 2 LSB at amount <= 1, for all samples without a "
                "threshold; with one, a pixel at the threshold may be sharpened on one backend only",
            ),
            working_memory=_unsharp_memory,
        ),
        FilterDefinition(
            "sobel",
            "Sobel derivative of every channel: |dx|, |dy| or the gradient magnitude, saturated.",
            (
                enum_param("direction", "magnitude", "x, y or magnitude.", ("x", "y", "magnitude")),
                int_param("ksize", 3, "Aperture: 1, 3, 5 or 7.", min=1, max=7, step=2),
            ),
            "same",
            Tolerance(1, note="x and y exact on 8-bit; magnitude within 1 LSB"),
            working_memory=_sobel_memory,
        ),
        FilterDefinition(
            "canny",
            "Canny edges of the grey image (BT.601); 16-bit input is reduced to 8 bits first. Edges are the "
            "maximum sample value, the rest 0.",
            (
                float_param("low", 50.0, "Lower hysteresis threshold.", min=0.0, max=5000.0),
                float_param("high", 150.0, "Upper hysteresis threshold.", min=0.0, max=5000.0),
                int_param("aperture", 3, "Sobel aperture: 3, 5 or 7.", min=3, max=7, step=2),
                bool_param("l2_gradient", False, "Use the L2 gradient norm instead of L1."),
            ),
            "1",
            EXACT,
            gpu=False,
            check=_check_canny,
            working_memory=_canny_memory,
        ),
        FilterDefinition(
            "threshold",
            "Binarises the grey image (colour is converted with BT.601 first) to 0 and the maximum value. "
            "binary: value > threshold; otsu: threshold chosen by Otsu's method; adaptive: value > mean of "
            "its block_size window - c.",
            (
                enum_param("method", "binary", "binary, otsu or adaptive.", ("binary", "otsu", "adaptive")),
                float_param("value", 128.0, "Threshold for binary (in sample units).", min=0.0, max=65535.0),
                bool_param("invert", False, "Swap the two output values."),
                int_param("block_size", 11, "Window of adaptive (odd).", min=3, max=255, step=2),
                int_param("c", 2, "Offset subtracted from the adaptive mean.", min=-65535, max=65535),
            ),
            "1",
            Tolerance(
                0,
                note="16-bit adaptive windows whose sums pass 2^24 may flip pixels at the threshold",
                fraction_16bit=0.999,
            ),
            working_memory=_threshold_memory,
        ),
        FilterDefinition(
            "resize",
            "Scales the image. Give scale, or width and/or height; with keep_aspect both fit inside "
            "width x height.",
            (
                int_param("width", 0, "Target width; 0 derives it.", min=0, max=16384),
                int_param("height", 0, "Target height; 0 derives it.", min=0, max=16384),
                float_param(
                    "scale", 0.0, "Scale factor; overrides width and height when > 0.", min=0.0, max=16.0
                ),
                enum_param(
                    "interpolation", "bilinear", "nearest, bilinear or area.", ("nearest", "bilinear", "area")
                ),
                bool_param("keep_aspect", True, "Keep the aspect ratio when both width and height are set."),
            ),
            "same",
            Tolerance(1, note="nearest exact"),
            check=_check_resize,
        ),
        FilterDefinition(
            "crop",
            "Cuts out a rectangle.",
            (
                int_param("x", 0, "Left edge.", min=0, max=65535),
                int_param("y", 0, "Top edge.", min=0, max=65535),
                int_param("width", 0, "Width; 0 runs to the right edge.", min=0, max=65535),
                int_param("height", 0, "Height; 0 runs to the bottom edge.", min=0, max=65535),
            ),
            "same",
            EXACT,
        ),
        FilterDefinition(
            "rotate",
            "Rotates counter-clockwise by angle degrees. Multiples of 90 are exact transposes; other angles "
            "interpolate, filling uncovered pixels with 0.",
            (
                float_param("angle", 90.0, "Angle in degrees, counter-clockwise.", min=-360.0, max=360.0),
                enum_param("interpolation", "bilinear", "nearest or bilinear.", ("nearest", "bilinear")),
                bool_param("expand", True, "Grow the canvas to hold the whole rotated image."),
            ),
            "same",
            Tolerance(1, 0.999, "right angles exact; nearest may take the other pixel at half-pixel ties"),
        ),
        FilterDefinition(
            "flip",
            "Mirrors the image.",
            (
                enum_param(
                    "direction",
                    "horizontal",
                    "horizontal, vertical or both.",
                    ("horizontal", "vertical", "both"),
                ),
            ),
            "same",
            EXACT,
        ),
        FilterDefinition(
            "adjust",
            "Brightness, contrast and gamma of the colour channels (alpha is kept): "
            "out = clip((x - 0.5) * contrast + 0.5 + brightness) ^ (1 / gamma), on values scaled to 0..1.",
            (
                float_param("brightness", 0.0, "Added, as a fraction of full scale.", min=-1.0, max=1.0),
                float_param("contrast", 1.0, "Multiplies the distance from mid-grey.", min=0.0, max=10.0),
                float_param("gamma", 1.0, "Gamma; > 1 brightens mid-tones.", min=0.1, max=10.0),
            ),
            "same",
            EXACT,
            working_memory=_adjust_memory,
        ),
        FilterDefinition(
            "invert",
            "Negative of the colour channels (alpha is kept).",
            (),
            "same",
            EXACT,
        ),
        FilterDefinition(
            "equalize",
            "Histogram equalisation of each colour channel (alpha is kept): global, or CLAHE (contrast "
            "limited, adaptive; on a GPU server CLAHE runs on the host).",
            (
                enum_param("method", "global", "global or clahe.", ("global", "clahe")),
                float_param("clip_limit", 2.0, "CLAHE contrast limit.", min=0.1, max=100.0),
                int_param("tiles", 8, "CLAHE tiles per side.", min=1, max=64),
            ),
            "same",
            Tolerance(0, note="global; CLAHE runs the CPU code on both"),
            working_memory=_equalize_memory,
        ),
        FilterDefinition(
            "convert_color",
            "Colour-space conversion of RGB(A) images (alpha is kept). 8-bit HSV uses the full 0..255 hue "
            "range; 16-bit scales hue 0..360 degrees to 0..65535.",
            (
                enum_param(
                    "conversion",
                    "rgb_to_hsv",
                    "rgb_to_hsv, hsv_to_rgb or rgb_to_bgr.",
                    ("rgb_to_hsv", "hsv_to_rgb", "rgb_to_bgr"),
                ),
            ),
            "same",
            Tolerance(1, note="rgb_to_bgr exact"),
            working_memory=_convert_memory,
        ),
    )
}


def runs_on_host(step: Step) -> bool:
    """Whether the GPU backend runs this step's CPU code on a host copy of its image: a filter the GPU does not
    implement (Canny), or CLAHE inside ``equalize``."""
    return not FILTERS[step.filter].gpu or (step.filter == "equalize" and step.as_str("method") == "clahe")


def validate_pipeline(
    steps: Sequence[tuple[str, Mapping[str, ParamScalar]]], prefix: str = "pipeline"
) -> list[Step]:
    """Check every step's filter and parameters; raise one InvalidArgument listing every problem."""
    if len(steps) > MAX_PIPELINE_STEPS:
        raise errors.InvalidArgument(
            f"a pipeline has at most {MAX_PIPELINE_STEPS} steps, got {len(steps)}",
            field_violations=[errors.FieldViolation(prefix, f"at most {MAX_PIPELINE_STEPS} steps")],
        )
    violations: list[errors.FieldViolation] = []
    resolved: list[Step] = []
    for index, (name, given) in enumerate(steps):
        where = f"{prefix}[{index}]"
        definition = FILTERS.get(name)
        if definition is None:
            valid = ", ".join(sorted(FILTERS))
            violations.append(
                errors.FieldViolation(
                    f"{where}.filter", f"unknown filter {shown(name)!r}; valid filters: {valid}"
                )
            )
            continue
        params: dict[str, ParamScalar] = {}
        for key, value in given.items():
            spec = definition.param(key)
            if spec is None:
                known = ", ".join(p.name for p in definition.params) or "none"
                violations.append(
                    errors.FieldViolation(
                        f"{where}.params.{shown(key)}",
                        f"{name} has no parameter {shown(key)!r}; its parameters: {known}",
                    )
                )
                continue
            coerced = spec.coerce(value)
            if isinstance(coerced, Violation):
                violations.append(errors.FieldViolation(f"{where}.params.{key}", str(coerced)))
            else:
                params[key] = coerced
        if len(params) != len(given):
            continue
        for spec in definition.params:
            params.setdefault(spec.name, spec.default)
        if definition.check is not None:
            for key, problem in definition.check(params):
                violations.append(errors.FieldViolation(f"{where}.params.{key}", problem))
        resolved.append(Step(name, index, params))
    if violations:
        raise errors.InvalidArgument(
            f"invalid pipeline: {errors.listing(violations)}", field_violations=violations
        )
    return resolved


def steps_from_proto(pipeline: Sequence[params_pb2.PipelineStep], prefix: str = "pipeline") -> list[Step]:
    """A request's pipeline as validated steps: the one reading for the service, its worker and the queue's
    check at submit."""
    raw: list[tuple[str, dict[str, ParamScalar]]] = []
    empty: list[errors.FieldViolation] = []
    for index, step in enumerate(pipeline):
        params: dict[str, ParamScalar] = {}
        for name, value in step.params.items():
            converted = param_value(value)
            if converted is None:
                empty.append(errors.FieldViolation(f"{prefix}[{index}].params.{shown(name)}", "has no value"))
            else:
                params[name] = converted
        raw.append((step.filter, params))
    if empty:
        raise errors.InvalidArgument(
            f"pipeline parameters without a value: {errors.listing(empty)}", field_violations=empty
        )
    return validate_pipeline(raw, prefix)
