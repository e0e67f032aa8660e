"""The filter catalogue: every filter's typed parameters, output channels, devices and CPU/GPU tolerance.

Both backends implement exactly these names; :func:`validate_pipeline` turns a request's steps into
:class:`Step` objects with every parameter checked and defaulted, or raises ``InvalidArgument`` naming each
bad field (``pipeline[1].params.sigma``) and its allowed range.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from mesh.common.v1 import params_pb2
from mesh.kit import errors
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
        ),
        FilterDefinition(
            "gaussian_blur",
            "Separable Gaussian blur of every channel.",
            (
                float_param("sigma", 1.0, "Standard deviation in pixels.", min=0.1, max=20.0),
                int_param(
                    "ksize",
                    0,
                    "Kernel size (odd); 0 derives it from sigma as 2 * ceil(3 * sigma) + 1.",
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
        ),
        FilterDefinition(
            "box_blur",
            "Mean over a square window, every channel.",
            (int_param("ksize", 3, "Window size (odd).", min=1, max=129, step=2), _border()),
            "same",
            ONE_LSB,
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
            Tolerance(2, note="blur rounding is amplified by amount; 2 LSB at amount <= 1"),
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
        ),
    )
}


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
