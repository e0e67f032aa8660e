"""The committed set of tricky cases (tests/data/strips): what each one is and how it was made.

``python -m mesh.services.inference.strip.cases DIRECTORY`` renders every case with the generator (seeds far
from both splits, some draws fixed) and writes the files and ``manifest.json`` with the expected verdicts.
The files are committed, so the tests read fixed bytes even if the generator changes later.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from mesh.services.inference.strip.generator import GeneratorOptions, Overrides, generate_with

CASE_SEED_BASE = 5_000_000


@dataclass(frozen=True)
class Case:
    """One tricky case: a name that says what is hard about it, its seed and the fixed draws."""

    name: str
    seed: int
    overrides: Overrides
    size: tuple[int, int] = (480, 360)


CASES: tuple[Case, ...] = (
    Case(
        "faint_t_4pct_cassette",
        1,
        Overrides(cls="positive", kind="cassette", t_contrast=0.04, c_contrast=0.5, image_format="png"),
    ),
    Case(
        "faint_t_5pct_strip",
        2,
        Overrides(cls="positive", kind="strip", t_contrast=0.05, c_contrast=0.6, image_format="png"),
    ),
    Case(
        "faint_t_6pct_blue_jpeg",
        3,
        Overrides(
            cls="positive",
            kind="cassette",
            t_contrast=0.06,
            c_contrast=0.5,
            colour="blue",
            image_format="jpeg",
            jpeg_quality=85,
        ),
    ),
    Case(
        "weak_c_negative", 4, Overrides(cls="negative", kind="cassette", c_contrast=0.08, image_format="png")
    ),
    Case(
        "weak_c_positive",
        5,
        Overrides(cls="positive", kind="strip", c_contrast=0.1, t_contrast=0.08, image_format="png"),
    ),
    Case(
        "shadow_across_window_negative",
        6,
        Overrides(cls="negative", kind="cassette", c_contrast=0.5, shadow=0.4, image_format="png"),
    ),
    Case(
        "shadow_across_window_positive",
        7,
        Overrides(
            cls="positive",
            kind="cassette",
            c_contrast=0.5,
            t_contrast=0.15,
            shadow=0.35,
            image_format="jpeg",
            jpeg_quality=80,
        ),
    ),
    Case(
        "jpeg_q40_positive",
        8,
        Overrides(
            cls="positive",
            kind="cassette",
            c_contrast=0.5,
            t_contrast=0.1,
            image_format="jpeg",
            jpeg_quality=40,
        ),
    ),
    Case(
        "jpeg_q40_negative",
        9,
        Overrides(cls="negative", kind="strip", c_contrast=0.4, image_format="jpeg", jpeg_quality=40),
    ),
    Case(
        "rotation_plus_15",
        10,
        Overrides(
            cls="positive", kind="cassette", angle=15.0, c_contrast=0.5, t_contrast=0.2, image_format="png"
        ),
    ),
    Case(
        "rotation_minus_15",
        11,
        Overrides(cls="negative", kind="strip", angle=-15.0, c_contrast=0.5, image_format="png"),
    ),
    Case("no_strip_plain", 12, Overrides(cls="none", image_format="jpeg", jpeg_quality=85)),
    Case("no_strip_clutter", 13, Overrides(cls="none", image_format="png")),
    Case(
        "invalid_t_only",
        14,
        Overrides(cls="invalid", kind="cassette", c_contrast=0.0, t_contrast=0.4, image_format="png"),
    ),
    Case(
        "invalid_no_lines",
        15,
        Overrides(
            cls="invalid", kind="strip", c_contrast=0.0, t_contrast=0.0, image_format="jpeg", jpeg_quality=85
        ),
    ),
    Case(
        "grey_positive",
        16,
        Overrides(
            cls="positive",
            kind="cassette",
            c_contrast=0.6,
            t_contrast=0.2,
            colour_mode="grey",
            image_format="png",
        ),
    ),
    Case(
        "rgba_negative",
        17,
        Overrides(cls="negative", kind="strip", c_contrast=0.5, colour_mode="rgba", image_format="png"),
    ),
    Case(
        "blur_2_5_positive",
        18,
        Overrides(
            cls="positive",
            kind="cassette",
            c_contrast=0.5,
            t_contrast=0.12,
            blur_at_1000=2.5,
            image_format="jpeg",
            jpeg_quality=90,
        ),
        size=(1000, 750),
    ),
    Case(
        "hd_positive",
        19,
        Overrides(
            cls="positive",
            kind="cassette",
            c_contrast=0.5,
            t_contrast=0.06,
            image_format="jpeg",
            jpeg_quality=70,
        ),
        size=(1280, 720),
    ),
    Case(
        "weak_c_6pct_beside_strong_t_jpeg",
        21,
        Overrides(
            cls="positive",
            kind="cassette",
            c_contrast=0.06,
            t_contrast=0.3,
            image_format="jpeg",
            jpeg_quality=70,
        ),
    ),
    Case(
        "small_320_negative",
        20,
        Overrides(cls="negative", kind="cassette", c_contrast=0.6, image_format="png"),
        size=(320, 240),
    ),
)


def build(directory: Path) -> list[dict[str, object]]:
    """Renders every case into ``directory`` and writes ``manifest.json``; returns the manifest entries."""
    directory.mkdir(parents=True, exist_ok=True)
    entries: list[dict[str, object]] = []
    for case in CASES:
        sample = generate_with(CASE_SEED_BASE + case.seed, case.overrides, GeneratorOptions(size=case.size))
        truth = sample.truth
        suffix = "jpg" if truth.image_format == "jpeg" else "png"
        filename = f"{case.name}.{suffix}"
        data = sample.encoded
        if suffix == "png":  # same pixels, smaller file
            pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            assert pixels is not None
            ok, buffer = cv2.imencode(
                ".png",
                pixels,
                [cv2.IMWRITE_PNG_COMPRESSION, 9],
            )
            if ok:
                data = buffer.tobytes()
        (directory / filename).write_bytes(data)
        entries.append(
            {
                "file": filename,
                "expected_verdict": truth.verdict.name,
                "t_contrast": round(truth.test_line.contrast, 4),
                "c_contrast": round(truth.control_line.contrast, 4),
                "kind": truth.kind,
                "angle_degrees": round(truth.angle_degrees, 2),
                "colour_mode": truth.colour_mode,
                "jpeg_quality": truth.jpeg_quality,
                "seed": truth.seed,
                "overrides": {k: v for k, v in asdict(case.overrides).items() if v is not None},
            }
        )
    (directory / "manifest.json").write_text(json.dumps({"cases": entries}, indent=2) + "\n")
    return entries


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else "tests/data/strips"))
