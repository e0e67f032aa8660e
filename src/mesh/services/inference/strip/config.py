"""The reader's tunable parameters; the detection thresholds come from the train split (see ``calibrate``).

``t_min_snr``, ``t_min_snr_bare`` and ``c_min_snr`` are the values ``python -m
mesh.services.inference.strip.calibrate --count 2000`` proposed (train seeds 0-2999 drawn as negatives, once as
cassettes and once as bare strips, and 0-1999 as invalid strips): the 99.75th percentile of the best false
candidate's signal-to-noise ratio on the negatives read through a cassette's window, on those read as bare strips
(for T) and on the invalid strips (for C), plus a quarter. They were last derived (2026-12-05, fifth session) for
the reader that averages the window's rows chosen by brightness, measures the lines' slant on C, searches T
18-37 % of the window left of C and leaves other clear lines out of T's noise (before: 3.74, 5.01 and 10.24).
With ``t_noise_floor`` at 0.0015 an earlier run on these changes proposed 4.37, 4.66 and 9.03, and the train
split read 0.974 against 0.9755 with 0.002. ``c_min_snr_beside_test`` (2026-12-05, sixth session) is the same
tail of the best false C found with a line left of the middle as the template, on the 798 train invalid strips
(of seeds 0-1999) that show one (``reader.TEMPLATE_LINE_SNR``)."""

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

    c_min_snr: float = 9.03
    """... and this many noise deviations of the line profile (calibrated on the train split)."""

    c_min_snr_beside_test: float = 4.05
    """... or this one where no C passed and C is found with T as the template, right of T at the lines'
    spacing (calibrated on the train split's invalid strips that show a T); such a C must reach
    ``t_min_intensity``, as any line the matched filter finds."""

    t_min_intensity: float = 0.006
    """A test line must reach this contrast (calibrated on the train split)."""

    t_min_snr: float = 3.65
    """... and this signal-to-noise ratio in a cassette's window (calibrated on the train split)."""

    t_min_snr_bare: float = 3.95
    """... or this one on a bare strip, whose false test lines run higher (calibrated on the train split): its
    window is the strip's whole width, a few rows across in a small picture, and JPEG blocks and the curvature
    of shadows and light across it make false lines that the noise measured beside the lines does not show. On
    train negatives (seeds 0-3999, before the colour match) the best false candidate's 99.5th percentile was
    5.07 on bare strips and 3.36 in windows; since the rows are chosen by brightness, the thresholds' gap
    narrowed from 1.27 to 0.30."""

    def t_snr_threshold(self, framed: bool) -> float:
        """The test line's signal-to-noise threshold for a cassette's window (``framed``) or a bare strip."""
        return self.t_min_snr if framed else self.t_min_snr_bare

    blur_flag_sigma: float = 4.0
    """Flag BLUR when the estimated defocus exceeds this sigma, in pixels at 1000 px image width."""

    underexposed_level: float = 0.18
    """Flag UNDEREXPOSED when the strip's median brightness lies below this (0..1)."""

    overexposed_fraction: float = 0.25
    """Flag OVEREXPOSED when more than this share of the strip's pixels is clipped."""

    uneven_ratio: float = 1.35
    """Flag UNEVEN_LIGHTING when the membrane's brightest part exceeds its darkest by this factor."""
