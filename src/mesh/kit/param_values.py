"""``mesh.common.v1.ParamValue`` to and from Python scalars, for every service that reads or writes parameters."""

from __future__ import annotations

from mesh.common.v1 import params_pb2

ParamScalar = bool | int | float | str


def param_value(value: params_pb2.ParamValue) -> ParamScalar | None:
    """The Python value of a ParamValue (None when unset)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    result: ParamScalar = getattr(value, kind)
    return result


def to_param_value(value: ParamScalar) -> params_pb2.ParamValue:
    """A ParamValue from a Python value (bool before int: ``True`` is an int in Python)."""
    if isinstance(value, bool):
        return params_pb2.ParamValue(bool_value=value)
    if isinstance(value, int):
        return params_pb2.ParamValue(int_value=value)
    if isinstance(value, float):
        return params_pb2.ParamValue(number_value=value)
    return params_pb2.ParamValue(string_value=value)
