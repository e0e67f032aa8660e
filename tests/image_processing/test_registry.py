"""The filter catalogue and parameter validation."""

from __future__ import annotations

import pytest

from mesh.common.v1 import params_pb2
from mesh.kit import errors
from mesh.services.image_processing.params import ParamType
from mesh.services.image_processing.registry import (
    FILTERS,
    MAX_PIPELINE_STEPS,
    Device,
    steps_from_proto,
    validate_pipeline,
)

REQUIRED = {
    "grayscale",
    "gaussian_blur",
    "box_blur",
    "median",
    "unsharp_mask",
    "sobel",
    "canny",
    "threshold",
    "resize",
    "crop",
    "rotate",
    "flip",
    "adjust",
    "invert",
    "equalize",
    "convert_color",
}


def _violations(error: errors.MeshError) -> dict[str, str]:
    return {v.field: v.description for v in error.field_violations}


def test_catalogue_has_every_required_filter_with_devices_and_tolerance() -> None:
    """Every filter of the issue is registered, runs on the CPU, and states its CPU/GPU tolerance."""
    assert set(FILTERS) == REQUIRED
    for definition in FILTERS.values():
        assert Device.CPU in definition.devices
        assert definition.tolerance.max_abs_diff <= 2
        assert definition.output_channels in ("same", "1")
        assert definition.description


def test_param_specs_are_self_consistent() -> None:
    """Defaults satisfy their own specs, enums list options and numbers have bounds."""
    for definition in FILTERS.values():
        for param in definition.params:
            assert param.coerce(param.default) == param.default, (definition.name, param.name)
            if param.type is ParamType.ENUM:
                assert param.default in param.options
            if param.type in (ParamType.INT, ParamType.FLOAT):
                assert param.min is not None
                assert param.max is not None


def test_defaults_are_filled_in() -> None:
    """Omitted parameters take their defaults; given ones are coerced to the spec's type."""
    (step,) = validate_pipeline([("gaussian_blur", {"sigma": 2})])
    assert step.params == {"sigma": 2.0, "ksize": 0, "border": "reflect"}
    assert isinstance(step.params["sigma"], float)


def test_out_of_range_names_the_field_and_the_range() -> None:
    """A number out of range is INVALID_ARGUMENT naming pipeline[i].params.x and the allowed range."""
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_pipeline([("invert", {}), ("gaussian_blur", {"sigma": 99.0})])
    violations = _violations(caught.value)
    assert list(violations) == ["pipeline[1].params.sigma"]
    assert "between 0.1 and 20" in violations["pipeline[1].params.sigma"]
    assert caught.value.code.name == "INVALID_ARGUMENT"


def test_unknown_filter_lists_the_valid_ones() -> None:
    """An unknown filter is named, with the list of valid filters."""
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_pipeline([("sharpen_magic", {})])
    description = _violations(caught.value)["pipeline[0].filter"]
    assert "sharpen_magic" in description
    assert "gaussian_blur" in description
    assert "grayscale" in description


@pytest.mark.parametrize(
    ("filter_name", "params", "field", "needle"),
    [
        ("median", {"ksize": 4}, "ksize", "steps of 2"),
        ("median", {"ksize": 7}, "ksize", "between 3 and 5"),
        ("grayscale", {"method": "bt2020"}, "method", "one of bt601"),
        ("flip", {"direction": 1}, "direction", "one of horizontal"),
        ("resize", {"keep_aspect": "yes"}, "keep_aspect", "true or false"),
        ("crop", {"x": 1.5}, "x", "an integer"),
        ("box_blur", {"ksize": True}, "ksize", "an integer"),
        ("adjust", {"gamma": float("nan")}, "gamma", "a number"),
        ("gaussian_blur", {"ksize": 4}, "ksize", "0 or odd"),
        ("canny", {"low": 200.0, "high": 100.0}, "low", "<= high"),
        ("resize", {}, "width", "width and/or height"),
        ("invert", {"strength": 1}, "strength", "no parameter"),
    ],
)
def test_bad_parameters_are_rejected(
    filter_name: str, params: dict[str, object], field: str, needle: str
) -> None:
    """Wrong types, ranges, steps, options, cross-field rules and unknown names name the field."""
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_pipeline([(filter_name, params)])  # type: ignore[list-item]
    violations = _violations(caught.value)
    assert f"pipeline[0].params.{field}" in violations
    assert needle in violations[f"pipeline[0].params.{field}"]


def test_integral_numbers_are_accepted_for_int_params() -> None:
    """JSON clients send 5.0 for 5: an integral float is an int parameter."""
    (step,) = validate_pipeline([("median", {"ksize": 5.0})])
    assert step.params["ksize"] == 5
    assert isinstance(step.params["ksize"], int)


def test_every_problem_is_reported_at_once() -> None:
    """All bad fields of a pipeline come back in one error."""
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_pipeline([("median", {"ksize": 9}), ("nope", {}), ("adjust", {"contrast": -1.0})])
    assert set(_violations(caught.value)) == {
        "pipeline[0].params.ksize",
        "pipeline[1].filter",
        "pipeline[2].params.contrast",
    }


def test_pipeline_length_is_bounded() -> None:
    """More steps than allowed is INVALID_ARGUMENT on the pipeline field."""
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_pipeline([("invert", {})] * (MAX_PIPELINE_STEPS + 1))
    assert "pipeline" in _violations(caught.value)


def test_a_huge_unknown_name_is_cut_in_the_error() -> None:
    """A parameter name, a filter name or a valueless parameter's name of a million characters is named by its
    first 40 characters and an ellipsis, in the field path and in the message: the error (logged by the service
    that refuses it, and by the queue that checks a job's pipeline) stays a few hundred characters."""
    huge = "k" * 1_000_000
    cut = "k" * 40 + "…"
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_pipeline([("invert", {huge: 1.0}), (huge, {})])
    violations = _violations(caught.value)
    assert list(violations) == [f"pipeline[0].params.{cut}", "pipeline[1].filter"]
    assert f"invert has no parameter {cut!r}" in violations[f"pipeline[0].params.{cut}"]
    assert f"unknown filter {cut!r}" in violations["pipeline[1].filter"]
    assert len(caught.value.message) < 1000
    valueless = params_pb2.PipelineStep(filter="invert", params={huge: params_pb2.ParamValue()})
    with pytest.raises(errors.InvalidArgument) as empty:
        steps_from_proto([valueless])
    assert list(_violations(empty.value)) == [f"pipeline[0].params.{cut}"]
    assert len(empty.value.message) < 1000


def test_a_huge_bad_value_is_cut_in_the_error() -> None:
    """An enum or boolean parameter sent a string of a million characters quotes its first 40 characters of the
    value's repr and an ellipsis, not the whole value (it was echoed up to the message's 512-byte cap)."""
    huge = "x" * 1_000_000
    with pytest.raises(errors.InvalidArgument) as caught:
        validate_pipeline([("grayscale", {"method": huge}), ("resize", {"width": 8, "keep_aspect": huge})])
    violations = _violations(caught.value)
    cut = repr(huge)[:40] + "…"
    assert violations["pipeline[0].params.method"].endswith(f"got {cut}")
    assert violations["pipeline[1].params.keep_aspect"] == f"must be true or false, got {cut}"
