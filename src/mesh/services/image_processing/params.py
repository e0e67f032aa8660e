"""Typed filter parameters: their specs and the validation that names the bad field and the allowed range.

Values arrive as plain Python values (``int``, ``float``, ``bool``, ``str``); :meth:`ParamSpec.coerce`
checks one against its spec and returns it in the spec's type, or returns a violation text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

from mesh.kit.param_values import ParamScalar
from mesh.kit.text_fields import shown


class ParamType(StrEnum):
    """The type of a filter parameter (mirrors ``mesh.image.v1.ParamType``)."""

    INT = "int"
    FLOAT = "float"
    BOOL = "bool"
    ENUM = "enum"


@dataclass(frozen=True)
class ParamSpec:
    """One parameter of a filter: its type, default, bounds and documentation."""

    name: str
    type: ParamType
    default: ParamScalar
    description: str
    min: float | None = None
    max: float | None = None
    step: float = 0.0
    options: tuple[str, ...] = field(default_factory=tuple)

    def allowed(self) -> str:
        """The allowed values in words, for error messages."""
        if self.type is ParamType.ENUM:
            return "one of " + ", ".join(self.options)
        if self.type is ParamType.BOOL:
            return "true or false"
        kind = "an integer" if self.type is ParamType.INT else "a number"
        parts = [kind]
        if self.min is not None and self.max is not None:
            parts.append(f"between {_fmt(self.min)} and {_fmt(self.max)}")
        elif self.min is not None:
            parts.append(f">= {_fmt(self.min)}")
        elif self.max is not None:
            parts.append(f"<= {_fmt(self.max)}")
        if self.step and self.type is ParamType.INT and self.step != 1:
            base = self.min if self.min is not None else 0
            parts.append(f"in steps of {_fmt(self.step)} from {_fmt(base)}")
        return " ".join(parts)

    def coerce(self, value: ParamScalar) -> ParamScalar | str:
        """The value in this spec's type, or a :class:`Violation` text explaining what is allowed.

        Returns ``Violation`` instances (a ``str`` subclass) for bad values so that callers can collect
        every problem of a request before raising.
        """
        if self.type is ParamType.BOOL:
            if isinstance(value, bool):
                return value
            return Violation(f"must be {self.allowed()}, got {_got(value)}")
        if self.type is ParamType.ENUM:
            if isinstance(value, str) and value in self.options:
                return value
            return Violation(f"must be {self.allowed()}, got {_got(value)}")
        if isinstance(value, bool) or not isinstance(value, int | float) or not self._admits(value):
            # Every refusal quotes the value as the client sent it, cut: float() of it made 2**63 - 1 read as
            # 9223372036854775808 and 1e308 as its 309 digits.
            return Violation(f"must be {self.allowed()}, got {_got(value)}")
        if self.type is ParamType.INT:
            return int(value)
        return float(value)

    def _admits(self, number: int | float) -> bool:
        """Whether a number is finite, of this spec's type (integral for INT), within its bounds and on its step.

        Compared as given, never through ``float()``: an int is compared exactly, and one past float's range
        (``10**400``) is out of bounds rather than an OverflowError."""
        if isinstance(number, float) and not math.isfinite(number):
            return False
        if self.type is ParamType.INT and isinstance(number, float) and not number.is_integer():
            return False
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            return False
        if self.type is ParamType.INT and self.step > 1:
            return (number - (self.min or 0)) % self.step == 0
        return True


def _got(value: ParamScalar) -> str:
    """A value a client sent, as a violation quotes it: its repr, cut (a 1 MB string is not echoed)."""
    return shown(repr(value))


class Violation(str):
    """A description of why a parameter value is not allowed."""


def int_param(name: str, default: int, description: str, *, min: int, max: int, step: int = 1) -> ParamSpec:
    """An integer parameter."""
    return ParamSpec(name, ParamType.INT, default, description, float(min), float(max), float(step))


def float_param(name: str, default: float, description: str, *, min: float, max: float) -> ParamSpec:
    """A continuous number parameter."""
    return ParamSpec(name, ParamType.FLOAT, default, description, min, max, 0.0)


def bool_param(name: str, default: bool, description: str) -> ParamSpec:
    """A boolean parameter."""
    return ParamSpec(name, ParamType.BOOL, default, description)


def enum_param(name: str, default: str, description: str, options: tuple[str, ...]) -> ParamSpec:
    """One of a fixed set of strings."""
    if default not in options:
        raise ValueError(f"default {default!r} of {name} is not among {options}")
    return ParamSpec(name, ParamType.ENUM, default, description, options=options)


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else f"{number:g}"
