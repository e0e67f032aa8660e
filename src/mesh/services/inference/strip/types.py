"""What the strip reader returns; mirrors ``StripReading`` in protos/mesh/inference/v1/inference_service.proto."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Verdict(enum.Enum):
    """The verdict of a lateral-flow test."""

    POSITIVE = "POSITIVE"
    NEGATIVE = "NEGATIVE"
    INVALID = "INVALID"


class QualityFlag(enum.Enum):
    """Image quality problems the reader found."""

    STRIP_NOT_FOUND = "STRIP_NOT_FOUND"
    BLUR = "BLUR"
    UNDEREXPOSED = "UNDEREXPOSED"
    OVEREXPOSED = "OVEREXPOSED"
    NO_CONTROL_LINE = "NO_CONTROL_LINE"
    UNEVEN_LIGHTING = "UNEVEN_LIGHTING"


@dataclass(frozen=True)
class LineReading:
    """One line (control or test): where it is and how strong, in the input image's coordinates."""

    present: bool
    position_px: float
    position: float
    intensity: float
    center_x: float
    center_y: float


ABSENT_LINE = LineReading(
    present=False, position_px=0.0, position=0.0, intensity=0.0, center_x=0.0, center_y=0.0
)


@dataclass(frozen=True)
class Window:
    """The read window in the input image: centre, length along the flow axis, width, rotation (CCW, deg)."""

    center_x: float
    center_y: float
    length: float
    width: float
    angle_degrees: float


@dataclass(frozen=True)
class StripReading:
    """The reader's full answer for one image."""

    verdict: Verdict
    control_line: LineReading
    test_line: LineReading
    t_to_c_ratio: float
    confidence: float
    quality_flags: tuple[QualityFlag, ...]
    window: Window | None
    precheck_only: bool
