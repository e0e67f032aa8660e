"""The reader's tunable parameters; the detection thresholds come from the train split (see ``calibrate``).

``t_min_snr`` and ``c_min_snr`` are the values ``python -m mesh.services.inference.strip.calibrate --count 2000``
proposed (train seeds 0-5999 drawn as negatives, 0-1999 as invalid strips): the 99.75th percentile of the best
false candidate's signal-to-noise ratio on the negatives (for T) and on the invalid strips (for C), plus a
quarter. They were last derived (2026-12-04) for the reader whose T noise is read with both lines bridged over,
whose T zone starts 0.18 left of C and whose bare-strip window ignores background beyond the strip's ends
(before: 5.42 and 10.25, from 2000 negatives)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReaderConfig:
    """Parameters of :class:`~mesh.services.inference.strip.reader.StripReader`."""

    work_size: int = 512
    """Longest side of the downscaled image in which the strip is searched."""

    crop_length: int = 960
    """Longest length, in pixels, of the rectified strip crop the lines are read from."""

    precheck_crop_length: int = 320
    """Crop length of the fast pre-check."""

    min_object_area: float = 0.0025
    """Smallest strip area, as a fraction of the (working) image's width squared: STRIP_READER.md puts a strip at
    30 % of the width or more, so the least it covers does not shrink with a portrait picture's height (a bare
    strip of aspect 0.06 at 30 % covers 0.0054 of it; as a fraction of the image area, 0.004 lost thin strips in
    portrait pictures)."""

    noise_floor: float = 0.002
    """Smallest profile noise assumed (contrast units): clean PNGs would otherwise make any ripple 'significant'."""

    t_noise_floor: float = 0.002
    """Smallest noise assumed for the matched test-line filter's output (contrast units): below it, residual
    background structure rather than pixel noise limits a faint line (lower floors raised the calibrated
    threshold more than they lowered the noise, on the train split)."""

    c_min_intensity: float = 0.02
    """A control line must reach this contrast against the membrane."""

    c_min_snr: float = 10.25
    """... and this many noise deviations of the line profile (calibrated on the train split)."""

    t_min_intensity: float = 0.006
    """A test line must reach this contrast (calibrated on the train split)."""

    t_min_snr: float = 5.11
    """... and this signal-to-noise ratio (calibrated on the train split)."""

    blur_flag_sigma: float = 4.0
    """Flag BLUR when the estimated defocus exceeds this sigma, in pixels at 1000 px image width."""

    underexposed_level: float = 0.18
    """Flag UNDEREXPOSED when the strip's median brightness lies below this (0..1)."""

    overexposed_fraction: float = 0.25
    """Flag OVEREXPOSED when more than this share of the strip's pixels is clipped."""

    uneven_ratio: float = 1.35
    """Flag UNEVEN_LIGHTING when the membrane's brightest part exceeds its darkest by this factor."""
