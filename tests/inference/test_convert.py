"""The strip reader's result as a protobuf message."""

from __future__ import annotations

import pytest

from mesh.inference.v1 import inference_service_pb2 as pb
from mesh.services.inference.convert import quality_flag_to_proto, strip_reading_to_proto, verdict_to_proto
from mesh.services.inference.strip.types import (
    ABSENT_LINE,
    LineReading,
    QualityFlag,
    StripReading,
    Verdict,
    Window,
)


def test_every_verdict_and_flag_has_a_proto_value() -> None:
    """The reader's enums and the proto's stay in step (a new member fails here, not in production)."""
    assert [verdict_to_proto(v) for v in Verdict] == [
        pb.VERDICT_POSITIVE,
        pb.VERDICT_NEGATIVE,
        pb.VERDICT_INVALID,
    ]
    assert {pb.QualityFlag.Name(quality_flag_to_proto(f)) for f in QualityFlag} == {
        f"QUALITY_FLAG_{f.name}" for f in QualityFlag
    }


def test_reading_fields_are_copied() -> None:
    """Lines, ratio, confidence, flags, window and the pre-check marker all reach the message."""
    control = LineReading(True, 612.5, 0.7, 0.4, 612.5, 300.0)
    test = LineReading(True, 480.0, 0.42, 0.1, 480.0, 301.0)
    reading = StripReading(
        verdict=Verdict.POSITIVE,
        control_line=control,
        test_line=test,
        t_to_c_ratio=0.25,
        confidence=0.93,
        quality_flags=(QualityFlag.BLUR, QualityFlag.UNEVEN_LIGHTING),
        window=Window(550.0, 300.0, 420.0, 60.0, -3.5),
        precheck_only=False,
    )
    message = strip_reading_to_proto(reading)
    assert message.verdict == pb.VERDICT_POSITIVE
    assert message.control_line.position_px == 612.5
    assert message.test_line.position == pytest.approx(0.42)
    assert message.test_line.center_y == 301.0
    assert message.t_to_c_ratio == 0.25
    assert message.confidence == pytest.approx(0.93)
    assert list(message.quality_flags) == [pb.QUALITY_FLAG_BLUR, pb.QUALITY_FLAG_UNEVEN_LIGHTING]
    assert message.window.angle_degrees == -3.5
    assert message.window.length == 420.0


def test_no_window_when_no_strip() -> None:
    """A reading without a strip leaves ``window`` unset and its lines absent."""
    reading = StripReading(
        Verdict.INVALID, ABSENT_LINE, ABSENT_LINE, 0.0, 0.8, (QualityFlag.STRIP_NOT_FOUND,), None, True
    )
    message = strip_reading_to_proto(reading)
    assert not message.HasField("window")
    assert not message.control_line.present
    assert message.precheck_only
