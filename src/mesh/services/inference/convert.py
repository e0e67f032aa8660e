"""The strip reader's result as the ``mesh.inference.v1.StripReading`` message.

The reader's types (``strip.types``) are matched structurally here, so that the serving side depends on
their shape only: enum members by name (``Verdict.POSITIVE`` -> ``VERDICT_POSITIVE``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from mesh.inference.v1 import inference_service_pb2 as pb


class _Member(Protocol):
    """An enum member."""

    @property
    def name(self) -> str: ...


class LineLike(Protocol):
    """Shape of ``strip.types.LineReading``."""

    @property
    def present(self) -> bool: ...
    @property
    def position_px(self) -> float: ...
    @property
    def position(self) -> float: ...
    @property
    def intensity(self) -> float: ...
    @property
    def center_x(self) -> float: ...
    @property
    def center_y(self) -> float: ...


class WindowLike(Protocol):
    """Shape of ``strip.types.Window``."""

    @property
    def center_x(self) -> float: ...
    @property
    def center_y(self) -> float: ...
    @property
    def length(self) -> float: ...
    @property
    def width(self) -> float: ...
    @property
    def angle_degrees(self) -> float: ...


class ReadingLike(Protocol):
    """Shape of ``strip.types.StripReading``."""

    @property
    def verdict(self) -> _Member: ...
    @property
    def control_line(self) -> LineLike: ...
    @property
    def test_line(self) -> LineLike: ...
    @property
    def t_to_c_ratio(self) -> float: ...
    @property
    def confidence(self) -> float: ...
    @property
    def quality_flags(self) -> Sequence[_Member]: ...
    @property
    def window(self) -> WindowLike | None: ...
    @property
    def precheck_only(self) -> bool: ...


def verdict_to_proto(verdict: _Member) -> pb.Verdict.ValueType:
    """``Verdict.X`` -> ``VERDICT_X``; raises ValueError for a verdict the proto does not know."""
    return pb.Verdict.Value(f"VERDICT_{verdict.name.upper()}")


def quality_flag_to_proto(flag: _Member) -> pb.QualityFlag.ValueType:
    """``QualityFlag.X`` -> ``QUALITY_FLAG_X``; raises ValueError for a flag the proto does not know."""
    return pb.QualityFlag.Value(f"QUALITY_FLAG_{flag.name.upper()}")


def line_to_proto(line: LineLike) -> pb.LineReading:
    """One line reading."""
    return pb.LineReading(
        present=bool(line.present),
        position_px=float(line.position_px),
        position=float(line.position),
        intensity=float(line.intensity),
        center_x=float(line.center_x),
        center_y=float(line.center_y),
    )


def strip_reading_to_proto(reading: ReadingLike) -> pb.StripReading:
    """The whole reading; ``window`` is left unset when the reader found no strip."""
    message = pb.StripReading(
        verdict=verdict_to_proto(reading.verdict),
        control_line=line_to_proto(reading.control_line),
        test_line=line_to_proto(reading.test_line),
        t_to_c_ratio=float(reading.t_to_c_ratio),
        confidence=float(reading.confidence),
        quality_flags=[quality_flag_to_proto(flag) for flag in reading.quality_flags],
        precheck_only=bool(reading.precheck_only),
    )
    window = reading.window
    if window is not None:
        message.window.CopyFrom(
            pb.StripGeometry(
                center_x=float(window.center_x),
                center_y=float(window.center_y),
                length=float(window.length),
                width=float(window.width),
                angle_degrees=float(window.angle_degrees),
            )
        )
    return message
