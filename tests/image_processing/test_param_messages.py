"""How a refused parameter value is quoted back, and how the catalogue tells the values a parameter takes."""

from __future__ import annotations

import pytest

from mesh.common.v1 import params_pb2
from mesh.kit import errors
from mesh.kit.param_values import ParamScalar, to_param_value
from mesh.kit.text_fields import MAX_SHOWN_CHARS
from mesh.services.image_processing.params import ParamType, Violation, float_param, int_param
from mesh.services.image_processing.processor import filter_catalogue
from mesh.services.image_processing.registry import FILTERS, Device, steps_from_proto, validate_pipeline

INT64_MAX = 2**63 - 1


def _refusal(filter_name: str, **params: ParamScalar) -> tuple[str, str]:
    """The InvalidArgument's message and its one field violation's description, for a pipeline of one step
    read as the service reads a request (``steps_from_proto``)."""
    step = params_pb2.PipelineStep(
        filter=filter_name, params={name: to_param_value(value) for name, value in params.items()}
    )
    with pytest.raises(errors.InvalidArgument) as caught:
        steps_from_proto([step])
    (violation,) = caught.value.field_violations
    return caught.value.message, violation.description


def test_the_largest_int64_is_quoted_as_sent_not_as_the_float_it_rounds_to() -> None:
    """ksize = 2**63 - 1 over gRPC is quoted as 9223372036854775807: read through float() it was reported as
    9223372036854775808, a value the client never sent."""
    message, description = _refusal("box_blur", ksize=INT64_MAX)
    assert description == f"must be an integer between 1 and 129 in steps of 2 from 1, got {INT64_MAX}"
    assert message.endswith(f"got {INT64_MAX}")
    assert "9223372036854775808" not in message


def test_a_huge_number_for_an_integer_parameter_is_quoted_short() -> None:
    """ksize = 1e308 is quoted as 1e+308, in the message and the BadRequest alike, not as the 309-digit
    integer it becomes."""
    message, description = _refusal("box_blur", ksize=1e308)
    assert description.endswith("got 1e+308")
    assert message.endswith("got 1e+308")
    assert len(message) < 200


@pytest.mark.parametrize(
    ("filter_name", "params", "quoted"),
    [
        ("box_blur", {"ksize": 131}, "131"),  # above max
        ("box_blur", {"ksize": -1}, "-1"),  # below min
        ("box_blur", {"ksize": 131.0}, "131.0"),  # above max, sent as a number
        ("box_blur", {"ksize": 4}, "4"),  # off the step
        ("box_blur", {"ksize": 4.0}, "4.0"),  # off the step, sent as a number
        ("gaussian_blur", {"sigma": 20.5}, "20.5"),  # a float above max
        ("gaussian_blur", {"sigma": 1e300}, "1e+300"),
        ("adjust", {"gamma": -1e-7}, "-1e-07"),
    ],
)
def test_every_range_and_step_refusal_quotes_the_value_as_the_client_sent_it(
    filter_name: str, params: dict[str, ParamScalar], quoted: str
) -> None:
    """Out of range or off the step, the violation ends with the client's value as sent (its repr), as the
    type refusals already did; the range ones printed float() of it."""
    _, description = _refusal(filter_name, **params)
    assert description.endswith(f", got {quoted}")


def test_an_integer_past_floats_range_is_refused_not_an_overflow_and_quoted_cut() -> None:
    """A Python int past float's range (possible where values do not come from protobuf's int64) is out of
    range, quoted cut to MAX_SHOWN_CHARS: float() of it raised OverflowError, a 500."""
    spec = int_param("ksize", 3, "Window.", min=1, max=129, step=2)
    refused = spec.coerce(10**400)
    assert isinstance(refused, Violation)
    assert refused.endswith(", got " + "1" + "0" * (MAX_SHOWN_CHARS - 1) + "…")
    assert isinstance(float_param("sigma", 1.0, "Sigma.", min=0.1, max=20.0).coerce(-(10**400)), Violation)


def test_values_in_range_keep_their_spec_type() -> None:
    """An integral number for an int parameter is an int, an int for a float parameter a float."""
    assert int_param("k", 3, "K.", min=1, max=129, step=2).coerce(5.0) == 5
    assert type(int_param("k", 3, "K.", min=1, max=129, step=2).coerce(5.0)) is int
    coerced = float_param("s", 1.0, "S.", min=0.1, max=20.0).coerce(2)
    assert coerced == 2.0
    assert type(coerced) is float


def _advertised(low: float, high: float, step: float, default: int) -> list[int]:
    """Up to 300 values min..max by step, but the default (resize's 0 width alone names no size at all)."""
    return [value for value in range(int(low), int(high) + 1, int(step) or 1)[:300] if value != default]


def test_every_integer_the_catalogue_advertises_is_accepted_or_its_description_says_which_are_not() -> None:
    """A client offering min..max by step (the web page's number field does) either gets every value accepted,
    or the description it shows says what is refused: gaussian_blur.ksize is advertised from 0 by 1 (its
    default 0 derives the size from sigma) and takes only 0 or odd sizes, which its description now says."""
    catalogue = {spec.name: spec for spec in filter_catalogue(Device.CPU).filters}
    undisclosed = []
    for definition in FILTERS.values():
        for param in catalogue[definition.name].params:
            spec = definition.param(param.name)
            assert spec is not None
            if spec.type is not ParamType.INT:
                continue
            refused = []
            for value in _advertised(param.min, param.max, param.step, param.default_value.int_value):
                try:
                    validate_pipeline([(definition.name, {param.name: value})])
                except errors.InvalidArgument as refusal:
                    if refusal.field_violations[0].field.endswith(f".{param.name}"):
                        refused.append(value)
            if refused and "refused" not in param.description:
                undisclosed.append((definition.name, param.name, refused[:3]))
    assert undisclosed == []


def test_gaussian_ksize_is_described_as_zero_or_odd_up_to_its_maximum() -> None:
    """The catalogue's gaussian_blur.ksize says 0 or odd from 1 to 129 and that even sizes are refused; the
    service refuses 4 and takes 0, 5 and 129."""
    (blur,) = [f for f in filter_catalogue(Device.CPU).filters if f.name == "gaussian_blur"]
    (ksize,) = [p for p in blur.params if p.name == "ksize"]
    assert (ksize.min, ksize.max, ksize.default_value.int_value) == (0, 129, 0)
    assert "0, which derives it from sigma" in ksize.description
    assert "an odd number from 1 to 129 (even sizes are refused)" in ksize.description
    _, description = _refusal("gaussian_blur", ksize=4)
    assert description == "must be 0 or odd, got 4"
    for value in (0, 5, 129):
        (step,) = validate_pipeline([("gaussian_blur", {"ksize": value})])
        assert step.as_int("ksize") == value
