"""The synthetic data generator: deterministic, stratified, truthful."""

from __future__ import annotations

from typing import Literal

import numpy as np

from mesh.services.inference.strip.generator import (
    CLASS_PATTERN,
    GeneratorOptions,
    Overrides,
    decode,
    generate,
    generate_with,
    split_seeds,
)
from mesh.services.inference.strip.types import Verdict


def test_same_seed_gives_same_bytes_and_truth() -> None:
    """Rendering a seed twice yields identical encoded bytes, pixels and truth."""
    for seed in (0, 3, 1_000_007):
        first, second = generate(seed), generate(seed)
        assert first.encoded == second.encoded
        assert first.truth == second.truth
        assert np.array_equal(first.image, second.image)


def test_different_seeds_differ() -> None:
    """Neighbouring seeds give different pictures."""
    assert generate(10).encoded != generate(11).encoded


def test_splits_are_disjoint_seed_ranges() -> None:
    """Train and held-out seeds never overlap, so calibration cannot see held-out images."""
    train = set(split_seeds("train", 5000))
    heldout = set(split_seeds("heldout", 5000))
    assert not train & heldout
    assert min(heldout) == 1_000_000


def test_classes_follow_the_seed_pattern() -> None:
    """Every ten seeds hold 4 positives, 3 negatives, 2 invalid strips and 1 image without a strip."""
    assert sorted(CLASS_PATTERN) == sorted(["positive"] * 4 + ["negative"] * 3 + ["invalid"] * 2 + ["none"])
    truths = [generate(seed, GeneratorOptions(size=(320, 240))).truth for seed in range(10)]
    verdicts = [t.verdict for t in truths]
    assert verdicts.count(Verdict.POSITIVE) == 4
    assert verdicts.count(Verdict.NEGATIVE) == 3
    assert verdicts.count(Verdict.INVALID) == 3
    assert sum(1 for t in truths if t.kind == "none") == 1


def test_truth_is_consistent_with_the_verdict() -> None:
    """A negative has C without T, an invalid has no C, a positive has both, no strip means no window."""
    for seed in range(20):
        truth = generate(seed, GeneratorOptions(size=(400, 300))).truth
        if truth.kind == "none":
            assert truth.window is None
            assert truth.verdict is Verdict.INVALID
            continue
        assert truth.window is not None
        assert truth.test_line.position < truth.control_line.position  # T left of C
        spacing = truth.control_line.position - truth.test_line.position
        assert 0.2 <= spacing <= 0.35
        if truth.verdict is Verdict.POSITIVE:
            assert truth.test_line.present
            assert truth.control_line.present
            assert truth.t_to_c == truth.test_line.contrast / truth.control_line.contrast
        elif truth.verdict is Verdict.NEGATIVE:
            assert truth.control_line.present
            assert not truth.test_line.present
        else:
            assert not truth.control_line.present


def test_overrides_fix_the_chosen_draws() -> None:
    """Fixed draws (class, kind, contrasts, angle, format, colour mode) are honoured."""
    sample = generate_with(
        42,
        Overrides(
            cls="positive",
            kind="strip",
            t_contrast=0.05,
            c_contrast=0.4,
            angle=-15.0,
            image_format="png",
            colour_mode="grey",
        ),
        GeneratorOptions(size=(480, 360)),
    )
    truth = sample.truth
    assert truth.verdict is Verdict.POSITIVE
    assert truth.kind == "strip"
    assert truth.test_line.contrast == 0.05
    assert truth.control_line.contrast == 0.4
    assert truth.angle_degrees == -15.0
    assert sample.encoded[:8] == b"\x89PNG\r\n\x1a\n"
    assert sample.image.shape == (360, 480)


def test_decoded_forms_match_the_colour_mode() -> None:
    """RGB decodes to HxWx3, RGBA to HxWx4, grey to HxW; the decoded pixels are what ``image`` holds."""
    shapes: dict[Literal["rgb", "rgba", "grey"], int | None] = {"rgb": 3, "rgba": 4, "grey": None}
    for mode, channels in shapes.items():
        sample = generate_with(
            7,
            Overrides(cls="negative", colour_mode=mode, image_format="png"),
            GeneratorOptions(size=(320, 240)),
        )
        image = decode(sample.encoded)
        assert np.array_equal(image, sample.image)
        if channels is None:
            assert image.ndim == 2
        else:
            assert image.shape[2] == channels
