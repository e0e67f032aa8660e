"""Typed model parameters: declared with defaults in a model's config, set per request, checked here.

A request's parameters are validated against the declaration (unknown names, wrong types, NaN or infinite
numbers, out of range or not among the options are InvalidArgument) and merged with the defaults. The resolved
values are hashable, so that requests with equal parameters can share a batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, model_validator

from mesh.common.v1 import params_pb2
from mesh.kit.errors import FieldViolation, InvalidArgument, listing
from mesh.kit.param_values import param_value

Scalar: TypeAlias = float | int | str | bool
ParamType: TypeAlias = Literal["number", "int", "string", "bool"]
# Resolved parameters: sorted (name, value) pairs, usable as a dictionary key.
ResolvedParameters: TypeAlias = tuple[tuple[str, Scalar], ...]


class ParameterSpec(BaseModel):
    """One parameter a request may set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ParamType
    """Value type: ``number`` (float), ``int``, ``string`` or ``bool``."""

    default: Scalar
    """Value used when a request does not set it."""

    description: str = ""
    """What it changes."""

    minimum: float | None = None
    """Smallest allowed value (numbers)."""

    maximum: float | None = None
    """Largest allowed value (numbers)."""

    options: tuple[str, ...] | None = None
    """Allowed values (strings)."""

    @model_validator(mode="after")
    def _default_is_valid(self) -> ParameterSpec:
        problem = self.problem(self.default)
        if problem:
            raise ValueError(f"default {self.default!r}: {problem}")
        return self

    def problem(self, value: Scalar) -> str:
        """Why ``value`` is not acceptable, or "" when it is."""
        if self.type == "bool":
            return "" if isinstance(value, bool) else "must be a bool"
        if self.type == "string":
            if not isinstance(value, str):
                return "must be a string"
            if self.options is not None and value not in self.options:
                return f"must be one of {', '.join(self.options)}"
            return ""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"must be a{'n int' if self.type == 'int' else ' number'}"
        if self.type == "int" and not isinstance(value, int):
            return "must be an int"
        # NaN passes both range comparisons, and as a batch key it equals nothing, not even itself.
        if isinstance(value, float) and not math.isfinite(value):
            return "must be a finite number"
        if self.minimum is not None and value < self.minimum:
            return f"must be >= {self.minimum:g}"
        if self.maximum is not None and value > self.maximum:
            return f"must be <= {self.maximum:g}"
        return ""

    def to_proto(self) -> params_pb2.ParamValue:
        """The default as a ``ParamValue``."""
        return to_param_value(self.type, self.default)


def to_param_value(kind: ParamType, value: Scalar) -> params_pb2.ParamValue:
    """A Python value as a ``ParamValue`` of the declared kind."""
    if kind == "bool":
        return params_pb2.ParamValue(bool_value=bool(value))
    if kind == "int":
        return params_pb2.ParamValue(int_value=int(value))
    if kind == "number":
        return params_pb2.ParamValue(number_value=float(value))
    return params_pb2.ParamValue(string_value=str(value))


def resolve_parameters(
    specs: Mapping[str, ParameterSpec], given: Mapping[str, params_pb2.ParamValue]
) -> ResolvedParameters:
    """Validate ``given`` against ``specs`` and fill in the defaults; raises InvalidArgument naming each field."""
    violations: list[FieldViolation] = []
    values: dict[str, Scalar] = {name: spec.default for name, spec in specs.items()}
    for name, raw in given.items():
        field = f"parameters[{name}]"
        spec = specs.get(name)
        if spec is None:
            known = ", ".join(sorted(specs)) or "none"
            violations.append(FieldViolation(field, f"unknown parameter; this model takes: {known}"))
            continue
        value = param_value(raw)
        if value is None:
            violations.append(FieldViolation(field, "no value set"))
            continue
        # An integer is a fine number; JSON clients cannot always tell them apart.
        if spec.type == "number" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        problem = spec.problem(value)
        if problem:
            violations.append(FieldViolation(field, problem))
            continue
        values[name] = value
    if violations:
        raise InvalidArgument(f"invalid model parameters: {listing(violations)}", field_violations=violations)
    return tuple(sorted(values.items()))
