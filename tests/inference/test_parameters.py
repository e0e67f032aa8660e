"""Request parameters: validated against the model's declaration and merged with its defaults."""

from __future__ import annotations

import pytest

from mesh.common.v1 import params_pb2
from mesh.kit.errors import FieldViolation, InvalidArgument
from mesh.services.inference.parameters import ParameterSpec, resolve_parameters

SPECS = {
    "threshold": ParameterSpec(type="number", default=0.5, minimum=0, maximum=1),
    "mode": ParameterSpec(type="string", default="fast", options=("fast", "exact")),
    "steps": ParameterSpec(type="int", default=3),
    "debug": ParameterSpec(type="bool", default=False),
}


def test_defaults_fill_what_the_request_leaves_out() -> None:
    """Unset parameters take their defaults; the result is sorted and hashable."""
    resolved = resolve_parameters(SPECS, {"steps": params_pb2.ParamValue(int_value=7)})
    assert resolved == (("debug", False), ("mode", "fast"), ("steps", 7), ("threshold", 0.5))
    assert hash(resolved)


def test_an_integer_is_accepted_for_a_number() -> None:
    """JSON clients may send 1 for 1.0."""
    resolved = dict(resolve_parameters(SPECS, {"threshold": params_pb2.ParamValue(int_value=1)}))
    assert resolved["threshold"] == 1.0


def test_every_bad_parameter_is_named() -> None:
    """Unknown names, wrong types, out-of-range values and unknown options each get a field violation, and the
    message names them too (a client may show only the message)."""
    given = {
        "colour": params_pb2.ParamValue(string_value="red"),
        "threshold": params_pb2.ParamValue(number_value=2.0),
        "mode": params_pb2.ParamValue(string_value="slow"),
        "steps": params_pb2.ParamValue(number_value=1.5),
        "debug": params_pb2.ParamValue(),
    }
    with pytest.raises(InvalidArgument) as info:
        resolve_parameters(SPECS, given)
    violations = {v.field: v.description for v in info.value.field_violations}
    assert violations["parameters[colour]"].startswith("unknown parameter; this model takes: debug, mode")
    assert violations["parameters[threshold]"] == "must be <= 1"
    assert violations["parameters[mode]"] == "must be one of fast, exact"
    assert violations["parameters[steps]"] == "must be an int"
    assert violations["parameters[debug]"] == "no value set"
    assert FieldViolation("parameters[threshold]", "must be <= 1") in info.value.field_violations
    assert "parameters[threshold]: must be <= 1" in info.value.message
    assert info.value.message.startswith("invalid model parameters: parameters[colour]: unknown parameter")


def test_a_bad_default_is_refused_at_declaration() -> None:
    """A declaration whose default breaks its own rules does not validate."""
    with pytest.raises(ValueError, match="must be >= 1"):
        ParameterSpec(type="int", default=0, minimum=1)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_number_that_is_not_finite_is_refused(value: float) -> None:
    """NaN passed every range check (it compares false to both bounds) and, as a batch key equal to nothing, made
    a new batcher per request; infinities passed where a bound was open. Both are refused, naming the field."""
    specs = {**SPECS, "gain": ParameterSpec(type="number", default=1.0)}
    for name in ("threshold", "gain"):
        with pytest.raises(InvalidArgument) as info:
            resolve_parameters(specs, {name: params_pb2.ParamValue(number_value=value)})
        assert info.value.field_violations == (
            FieldViolation(f"parameters[{name}]", "must be a finite number"),
        )
