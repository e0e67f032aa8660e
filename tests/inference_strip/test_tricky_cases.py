"""The committed tricky cases (tests/data/strips) each read to their expected verdict."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from mesh.services.inference.strip.generator import decode
from mesh.services.inference.strip.reader import StripReader
from mesh.services.inference.strip.types import QualityFlag, Verdict

DATA = Path(__file__).resolve().parents[1] / "data" / "strips"
CASES: list[dict[str, Any]] = json.loads((DATA / "manifest.json").read_text())["cases"]
READER = StripReader()


def test_the_set_covers_the_hard_conditions() -> None:
    """Faint T, weak C, shadows, heavy JPEG, rotation at both limits, no strip and invalids are all there."""
    names = " ".join(case["file"] for case in CASES)
    for needle in (
        "faint_t",
        "weak_c",
        "shadow",
        "jpeg_q40",
        "rotation_plus_15",
        "rotation_minus_15",
        "no_strip",
        "invalid",
    ):
        assert needle in names
    assert {case["expected_verdict"] for case in CASES} == {"POSITIVE", "NEGATIVE", "INVALID"}


@pytest.mark.parametrize("case", CASES, ids=[case["file"] for case in CASES])
def test_case_reads_to_its_expected_verdict(case: dict[str, Any]) -> None:
    """The reader's verdict equals the manifest's; no strip also says STRIP_NOT_FOUND."""
    image = decode((DATA / case["file"]).read_bytes())
    reading = READER.read(image)
    assert reading.verdict.name == case["expected_verdict"]
    if case["kind"] == "none":
        assert QualityFlag.STRIP_NOT_FOUND in reading.quality_flags
        assert reading.window is None
    if reading.verdict is Verdict.POSITIVE:
        assert reading.test_line.present
        assert reading.control_line.present
        assert reading.test_line.center_x != 0.0
        assert reading.t_to_c_ratio > 0.0


@pytest.mark.parametrize("case", CASES, ids=[case["file"] for case in CASES])
def test_precheck_agrees_on_usability(case: dict[str, Any]) -> None:
    """The pre-check finds the strip (or not) exactly as the full reading does, and says it is a pre-check."""
    image = decode((DATA / case["file"]).read_bytes())
    pre = READER.precheck(image)
    full = READER.read(image)
    assert pre.precheck_only
    assert not full.precheck_only
    assert (QualityFlag.STRIP_NOT_FOUND in pre.quality_flags) == (
        QualityFlag.STRIP_NOT_FOUND in full.quality_flags
    )
