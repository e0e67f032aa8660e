"""The line profile on synthetic windows: de-skew, the matched T filter, and the T/C ratio it measures."""

from __future__ import annotations

from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest

from mesh.services.inference.strip import reader as reader_module
from mesh.services.inference.strip.config import ReaderConfig
from mesh.services.inference.strip.profile import (
    MEMBRANE_SHARE,
    Peak,
    Profile,
    WindowBox,
    _bright_rows,
    _clean_rows,
    _refined_max,
    find_window,
    matched_test_line,
    window_profile,
)
from mesh.services.inference.strip.reader import StripReader

MEMBRANE = np.array([0.93, 0.91, 0.86], np.float32)
RED = np.array([0.35, 1.0, 0.6], np.float32)
BLUE_LINE = np.array([1.0, 0.7, 0.2], np.float32)
LENGTH, HEIGHT = 300, 60
C_AT, T_AT = 0.65, 0.37
ZONE = (C_AT - 0.4, C_AT - 0.16)


def _window(
    lines: list[tuple[float, float]],
    slope: float = 0.0,
    width: float = 6.0,
    noise: float = 0.0,
    step_at: float | None = None,
    length: int = LENGTH,
    penumbra_at: float | None = None,
    colour: npt.NDArray[np.float32] = RED,
) -> npt.NDArray[Any]:
    """A membrane-coloured window; each line (position as a fraction, contrast) drifts ``slope`` px per row."""
    rows = np.arange(HEIGHT, dtype=np.float32)[:, None]
    xs = np.arange(length, dtype=np.float32)[None, :]
    image = np.ones((HEIGHT, length, 3), np.float32) * MEMBRANE
    for position, contrast in lines:
        centre = position * length + slope * (rows - (HEIGHT - 1) / 2)
        shape = np.exp(-0.5 * ((xs - centre) / (width / 2.355)) ** 2)
        image *= (1 - contrast * shape)[:, :, None] * colour + (1 - colour)
    if step_at is not None:
        # A shadow edge across the window: everything right of it 6 % darker, with a soft edge.
        image *= (1 - 0.06 / (1 + np.exp(-(xs - step_at * length) / 1.5)))[:, :, None]
    if penumbra_at is not None:
        # A soft shadow's penumbra: brightness falls by 15 % over about 80 px, steepest at ``penumbra_at``.
        image *= (1 - 0.15 / (1 + np.exp(-(xs - penumbra_at * length) / 20.0)))[:, :, None]
    if noise > 0:
        image += np.random.default_rng(7).normal(0, noise, image.shape).astype(np.float32)
    clipped: npt.NDArray[Any] = np.clip(image, 0, 1)
    return clipped


def _profile(image: npt.NDArray[Any]) -> Profile:
    box = WindowBox(0.0, 0.0, float(image.shape[1]), float(image.shape[0]), framed=True)
    return window_profile(image, box, noise_floor=0.002)


def _control(profile: Profile) -> Peak:
    return max((p for p in profile.peaks if p.index / profile.signal.size > 0.5), key=lambda p: p.height)


def test_a_tilted_line_is_stood_upright() -> None:
    """A line drifting 0.15 px per row (9 px over the window) reads as tall and narrow as an upright one."""
    upright = _control(_profile(_window([(C_AT, 0.5)])))
    tilted = _control(_profile(_window([(C_AT, 0.5)], slope=0.15)))
    assert abs(tilted.index - upright.index) < 1.0
    assert tilted.height > 0.9 * upright.height


def test_matched_filter_finds_a_faint_line_and_measures_its_ratio() -> None:
    """A 1.5 % T beside a 50 % C in 1 % pixel noise is found far above the noise, at about 0.03 of C."""
    profile = _profile(_window([(C_AT, 0.5), (T_AT, 0.015)], noise=0.01))
    control = _control(profile)
    test = matched_test_line(profile, control, ZONE, noise_floor=0.002)
    assert test is not None
    assert abs(test.index / LENGTH - T_AT) < 0.01
    assert test.snr > 6
    assert 0.02 < test.height / control.height < 0.04


def test_matched_filter_ignores_a_shadow_edge() -> None:
    """A 6 % brightness step inside the T zone (no T line) gives no candidate anywhere near threshold."""
    profile = _profile(_window([(C_AT, 0.5)], noise=0.004, step_at=T_AT))
    test = matched_test_line(profile, _control(profile), ZONE, noise_floor=0.002)
    assert test is not None
    assert test.snr < 3


def test_a_faint_line_on_a_penumbra_keeps_its_depth() -> None:
    """A 3 % T where a soft shadow's brightness falls steeply across it reads near its true 0.06 of C (0.059
    without the shadow): the background under it follows the slope instead of stopping at the line's lower
    shoulder, which left 0.01."""
    profile = _profile(_window([(C_AT, 0.5), (T_AT, 0.03)], width=8.0, penumbra_at=T_AT))
    control = _control(profile)
    test = matched_test_line(profile, control, ZONE, noise_floor=0.002)
    assert test is not None
    assert abs(test.index / LENGTH - T_AT) < 0.01
    assert 0.045 < test.height / control.height < 0.07


def test_ratio_is_right_when_t_sits_close_to_c_in_a_short_window() -> None:
    """In a 60 px window with wide lines, C does not pull T's strength down: T/C reads near its true 0.4."""
    profile = _profile(_window([(C_AT, 0.5), (C_AT - 0.2, 0.2)], width=4.0, length=60))
    control = _control(profile)
    test = matched_test_line(profile, control, ZONE, noise_floor=0.002)
    assert test is not None
    assert 0.36 < test.height / control.height < 0.44


def test_control_line_is_not_taken_from_the_window_rim() -> None:
    """A dark line hugging the window's right end (its rim) is no C; the same line at 65 % is one."""
    reader = StripReader(ReaderConfig())
    assert reader._lines(_profile(_window([(0.9, 0.3)], noise=0.004)), framed=True).control is None
    assert reader._lines(_profile(_window([(C_AT, 0.3)], noise=0.004)), framed=True).control is not None


def test_a_test_candidate_of_another_colour_than_c_is_discounted() -> None:
    """A 3 % dip of the red channel alone where T belongs (a JPEG's chroma block shifts one colour; C absorbs
    green most) counts for nothing; a T of C's colour and the same depth keeps its whole signal-to-noise ratio."""
    off_colour = _window([(C_AT, 0.5)], noise=0.002)
    xs = np.arange(LENGTH, dtype=np.float32)
    off_colour[:, :, 0] *= 1 - 0.03 * np.exp(-0.5 * ((xs - T_AT * LENGTH) / (6.0 / 2.355)) ** 2)
    profile = _profile(off_colour)
    other = matched_test_line(profile, _control(profile), ZONE, noise_floor=0.002)
    profile = _profile(_window([(C_AT, 0.5), (T_AT, 0.03)], noise=0.002))
    alike = matched_test_line(profile, _control(profile), ZONE, noise_floor=0.002)
    assert other is not None
    assert alike is not None
    assert other.colour_match == 0.0
    assert other.snr == 0.0
    assert abs(alike.index / LENGTH - T_AT) < 0.01
    assert alike.colour_match > 0.95
    assert alike.snr > 2 * ReaderConfig().t_min_snr


def test_a_clipped_channel_does_not_spoil_the_colour_match() -> None:
    """Red clipped on a bright membrane: a 50 % blue C still darkens red, a 4 % T hardly does, so over all
    channels T's colour differs from C's (its ratio fell to 0); over the unclipped ones it matches, and T passes
    both thresholds."""
    image = _window([(C_AT, 0.5), (T_AT, 0.04)], noise=0.002, colour=BLUE_LINE)
    image[:, :, 0] = np.clip(image[:, :, 0] * 1.12, 0, 1)
    profile = _profile(image)
    assert profile.membrane_level[0] >= 0.99
    test = matched_test_line(profile, _control(profile), ZONE, noise_floor=0.002)
    assert test is not None
    assert abs(test.index / LENGTH - T_AT) < 0.01
    assert test.colour_match > 0.95
    assert test.snr > ReaderConfig().t_min_snr_bare


def test_a_bare_strip_has_its_own_test_line_threshold() -> None:
    """The same profile passes T through a cassette's window and not on a bare strip when only the bare
    strip's threshold is out of reach."""
    reader = StripReader(ReaderConfig(t_min_snr=1.0, t_min_snr_bare=1000.0))
    profile = _profile(_window([(C_AT, 0.5), (T_AT, 0.03)], noise=0.002))
    assert reader._lines(profile, framed=True).test is not None
    assert reader._lines(profile, framed=False).test is None


def _blocky(image: npt.NDArray[Any], bumps: list[tuple[int, float]]) -> npt.NDArray[Any]:
    """``image`` with JPEG-like 8-pixel block levels: each (block column, drop) darkens that block column
    (a negative drop brightens it)."""
    out = image.copy()
    for block, drop in bumps:
        out[:, 8 * block : 8 * block + 8] *= 1 - drop
    return out


def test_heavy_tailed_block_levels_stay_under_the_threshold() -> None:
    """Over 20 cassette windows whose 8-px block columns have heavy-tailed levels (a JPEG's, shared by all rows,
    0.15 % typical), 18 make no false test line over the T threshold. The two that do (SNR 6.7 and 4.2 against
    3.65) are single block columns 0.96 % and 0.81 % darker than their neighbours: as deep as a faint T, which a
    reader that finds 1-2 % lines cannot tell from one (grey, they keep 0.9 of their ratio on a red C's
    colour); such rare strong blocks are why T's noise is the filter's RMS output, which they raise."""
    snrs = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        levels = [(block, float(drop)) for block, drop in enumerate(rng.laplace(0, 0.0015, LENGTH // 8))]
        profile = _profile(_blocky(_window([(C_AT, 0.5)], width=8.0, noise=0.002), levels))
        test = matched_test_line(profile, _control(profile), ZONE, noise_floor=0.002)
        assert test is not None
        snrs.append(test.snr)
    assert sum(snr >= ReaderConfig().t_min_snr for snr in snrs) == 2
    assert max(snrs) < 2 * ReaderConfig().t_min_snr


def test_a_bare_strips_edge_rows_are_left_out() -> None:
    """On a bare strip, a dark patch in the outer 15 % of rows (background bled in) makes no test line."""
    image = _window([(C_AT, 0.5)], noise=0.003)
    xs = slice(int(T_AT * LENGTH) - 6, int(T_AT * LENGTH) + 6)
    image[: int(0.15 * HEIGHT), xs] *= 0.6
    box = WindowBox(0.0, 0.0, float(LENGTH), float(HEIGHT), framed=False)
    profile = window_profile(image, box, noise_floor=0.002)
    test = matched_test_line(profile, _control(profile), ZONE, noise_floor=0.002)
    assert test is None or test.snr < ReaderConfig().t_min_snr


def test_a_bare_strips_membrane_is_found_by_texture_where_no_step_shows() -> None:
    """Pad and wick as bright as the membrane (a shadow can even them out) but fibrous: the window still
    spans the smooth membrane between them, not the whole strip."""
    rng = np.random.default_rng(3)
    rows, length = 40, 400
    grey = np.full((rows, length), 0.8, np.float32)
    fibres = cv2.resize(rng.normal(0, 0.025, (rows, length // 6)).astype(np.float32), (length, rows))
    pad, wick = slice(0, 100), slice(290, length)
    grey[:, pad] *= 1 + fibres[:, pad]
    grey[:, wick] *= 1 + fibres[:, wick]
    grey += rng.normal(0, 0.004, grey.shape).astype(np.float32)
    box = find_window(grey, across_margin=0.0)
    assert not box.framed
    assert abs(box.x0 - 100) < 15
    assert abs(box.x1 - 290) < 15


def test_a_slanted_shadow_edge_on_a_bare_strip_is_not_taken_for_the_wick() -> None:
    """A shadow edge crossing the membrane at a slant (its columns ramp smoothly across the rows) hides
    the wick's brightness step; the window still ends at the fibrous wick, not at the shadow."""
    rng = np.random.default_rng(5)
    rows, length = 40, 400
    grey = np.full((rows, length), 0.8, np.float32)
    fibres = cv2.resize(rng.normal(0, 0.025, (rows, length // 6)).astype(np.float32), (length, rows))
    pad, wick = slice(0, 100), slice(290, length)
    grey[:, pad] *= 0.8  # the pad's brightness step shows; the wick's is hidden by the light beyond
    grey[:, pad] *= 1 + fibres[:, pad]
    grey[:, wick] *= 1 + fibres[:, wick]
    # Shadow over the left part of the membrane, its edge running from x=200 (top row) to x=240 (bottom).
    xs = np.arange(length, dtype=np.float32)[None, :]
    edge = 200 + 40 * np.arange(rows, dtype=np.float32)[:, None] / (rows - 1)
    grey *= np.where(xs < edge, 0.6, 1.0).astype(np.float32)
    grey += rng.normal(0, 0.004, grey.shape).astype(np.float32)
    box = find_window(grey, across_margin=0.0)
    assert not box.framed
    assert abs(box.x1 - 290) < 15


def test_a_bare_strip_crop_that_starts_on_background_starts_its_window_at_the_membrane() -> None:
    """The crop takes in 50 px of dark background before the strip's end (the locator made the strip too
    long): the sharp step from background up to the pad is the strip's end, and the window starts at the
    pad's weaker step up to the membrane."""
    rng = np.random.default_rng(11)
    rows, length, margin = 40, 400, 6
    grey = np.full((rows, length), 0.3, np.float32)  # background, also in the margins above and below
    strip = grey[margin : rows - margin]
    strip[:, 50:] = 0.8
    strip[:, 50:130] *= 0.82  # the sample pad
    strip[:, 320:] *= 0.88  # the wick
    grey += rng.normal(0, 0.004, grey.shape).astype(np.float32)
    box = find_window(grey, across_margin=float(margin))
    assert not box.framed
    assert abs(box.x0 - 130) < 8
    assert abs(box.x1 - 320) < 8


def test_a_bare_strip_whose_wick_does_not_show_takes_its_window_from_the_strips_proportions() -> None:
    """The wick as bright and as smooth as the membrane (light and blur can hide both its step and its
    fibres): the window ends where a membrane of usual length would, past C, not at the strip's far end,
    where the wick's edge would be read as C and C as T."""
    rng = np.random.default_rng(13)
    rows, length = 40, 400
    grey = np.full((rows, length), 0.8, np.float32)
    grey[:, :100] *= 0.8  # the sample pad's step shows
    grey[:, 226:234] *= 0.6  # C
    grey += rng.normal(0, 0.004, grey.shape).astype(np.float32)
    box = find_window(grey, across_margin=0.0)
    assert abs(box.x0 - 100) < 5
    assert abs(box.x1 - (box.x0 + MEMBRANE_SHARE * length)) < 2
    assert 0.5 < (230 - box.x0) / (box.x1 - box.x0) < 0.82


def test_a_bare_strip_seen_from_its_membrane_on_starts_its_window_there() -> None:
    """The sample pad too dim beside the background to count as strip (train seed 488): the strip as seen
    starts at the membrane, whose wick lies 0.56 of the way along. A window placed by the strip's proportions
    began 0.46 of that length before the wick, past C, and the test read INVALID; with no room for a pad
    before the wick's border, the window starts where the strip does."""
    rng = np.random.default_rng(19)
    rows, length, margin = 40, 400, 6
    grey = np.full((rows, length), 0.3, np.float32)  # background, also in the margins above and below
    strip = grey[margin : rows - margin]
    strip[:, 60:] = 0.8  # the membrane, from the strip's visible start
    strip[:, :60] = 0.38  # the pad: brighter than the background, but not 1.4 times
    strip[:, 250:] *= 0.88  # the wick: 0.56 of the strip as seen (60-400)
    strip[:, 126:131] *= 0.55  # C, 0.36 along the membrane
    grey += rng.normal(0, 0.004, grey.shape).astype(np.float32)
    box = find_window(grey, across_margin=float(margin))
    assert not box.framed
    assert abs(box.x0 - 60) < 5
    assert abs(box.x1 - 250) < 8


def test_texture_that_rises_just_before_c_is_not_taken_for_the_wick() -> None:
    """A JPEG rings around a strong C, so the membrane's texture rises just before it; where the wick shows
    neither a step nor fibres, that rise was taken for the wick and the window ended at C. The window ends
    where a membrane of usual length would, with C inside it."""
    rng = np.random.default_rng(17)
    rows, length = 40, 400
    grey = np.full((rows, length), 0.8, np.float32)
    grey[:, :100] *= 0.8  # the sample pad's step shows
    grey[:, 226:234] *= 0.6  # C
    noise = np.full(length, 0.004, np.float32)
    noise[214:246] = 0.012  # ringing around C
    grey += rng.normal(0, 1, grey.shape).astype(np.float32) * noise
    box = find_window(grey, across_margin=0.0)
    assert abs(box.x0 - 100) < 5
    assert abs(box.x1 - (box.x0 + MEMBRANE_SHARE * length)) < 2
    assert 0.5 < (230 - box.x0) / (box.x1 - box.x0) < 0.82


def test_texture_that_falls_just_after_c_is_not_taken_for_the_pads_end() -> None:
    """The crop starts on the membrane (the pad runs off the picture, or is too dark to count as strip), so no
    brightness step shows the pad's end and texture is searched for it; JPEG noise that is higher up to C
    and lower after it makes texture fall just past C, and the window began there, with C outside it. The pad
    never ends just after a line: the window keeps C inside it."""
    rng = np.random.default_rng(5)
    rows, length = 40, 500
    grey = np.full((rows, length), 0.8, np.float32)
    grey[:, 250:] *= 0.85  # the wick's step shows
    grey[:, 146:154] *= 0.6  # C
    noise = np.full(length, 0.004, np.float32)
    noise[:160] = 0.012
    grey += rng.normal(0, 1, grey.shape).astype(np.float32) * noise
    box = find_window(grey, across_margin=0.0)
    assert abs(box.x1 - 250) < 5
    assert box.x0 < 100
    assert 0.5 < (150 - box.x0) / (box.x1 - box.x0) < 0.82


@pytest.mark.parametrize(
    ("length", "shadow", "wick_tolerance"),
    [(400, slice(234, None), 8), (600, slice(None, 234), 5)],
    ids=["light-falls-at-c-not-the-wick", "light-rises-after-c-not-the-pads-end"],
)
def test_a_shadow_edge_at_c_is_taken_for_neither_border(
    length: int, shadow: slice, wick_tolerance: int
) -> None:
    """A shadow's edge right at C steps the light more sharply than the pad's or the wick's own border. Where
    the light falls off from C's right edge on, the closing fills C only up to its lower shoulder, so the
    envelope steps down at C's left edge, and that was taken for the wick; where a shadow over the pad and the
    membrane ends at C's right edge, the step up was taken for the pad's end (the window began at 233 and ran on
    to 575). The wick never begins just before a line, nor does the pad end just after one: the window is the
    membrane, pad to wick, with C inside it."""
    rng = np.random.default_rng(14)
    rows = 40
    grey = np.full((rows, length), 0.8, np.float32)
    grey[:, :100] *= 0.8  # the sample pad
    grey[:, shadow] *= 0.75
    grey[:, 300:] *= 0.85  # the wick
    grey[:, 226:234] *= 0.6  # C
    grey += rng.normal(0, 0.004, grey.shape).astype(np.float32)
    box = find_window(grey, across_margin=0.0)
    assert abs(box.x0 - 100) < 5
    assert abs(box.x1 - 300) < wick_tolerance
    assert 0.5 < (230 - box.x0) / (box.x1 - box.x0) < 0.82


def test_a_membrane_step_just_past_the_search_zone_is_still_found() -> None:
    """When the pad is long for its crop (its step to the membrane lies at 44 % of the strip, past the zone
    the step is searched in), the step is still found at its peak, not at the zone's edge nor at the
    strip's end."""
    rng = np.random.default_rng(12)
    rows, length = 40, 300
    grey = np.full((rows, length), 0.8, np.float32)
    grey[:, :132] *= 0.8
    grey[:, 270:] *= 0.85
    grey += rng.normal(0, 0.004, grey.shape).astype(np.float32)
    box = find_window(grey, across_margin=0.0)
    assert abs(box.x0 - 132) < 5


def test_a_strong_test_line_in_a_short_window_is_not_judged_against_its_own_side_lobes() -> None:
    """In an 80-sample profile an 8.5 % T beside a 30 % C (4-sample lines, 0.1 % noise) reads the SNR the
    noise floor allows (0.085 / 0.002) on every noise draw: its noise is read with both lines bridged over.
    Read from the filter output beside the lines instead, the few samples left held T's own side lobes, so
    that T's strength raised its own noise: on two of these ten draws such a T read SNR 16 and 22."""
    n = 80
    xs = np.arange(n, dtype=np.float32)

    def line(centre: float, contrast: float) -> npt.NDArray[np.float32]:
        shape: npt.NDArray[np.float32] = np.exp(-0.5 * ((xs - centre) / np.float32(4 / 2.355)) ** 2)
        return np.float32(contrast) * shape

    snrs = []
    for seed in range(10):
        noise = np.random.default_rng(seed).normal(0, 0.001, n)
        signal = (line(52, 0.3) + line(32, 0.085) + noise).astype(np.float32)
        control = Peak(index=52.0, height=0.3, snr=100.0, chroma=0.6)
        profile = Profile(
            signal=signal,
            noise=0.001,
            level_ratio=1.0,
            peaks=(control,),
            absorb=np.outer(signal, RED).astype(np.float32),
            split_noise=np.zeros((n, 3), np.float32),
            membrane_level=MEMBRANE,
        )
        test = matched_test_line(profile, control, (0.65 - 0.4, 0.65 - 0.16), noise_floor=0.002)
        assert test is not None
        assert abs(test.index - 32) <= 1
        snrs.append(test.snr)
    assert min(snrs) > 35


def test_a_slanted_rim_beside_c_does_not_shear_the_window() -> None:
    """In a small window (10 rows, 35 px) a shaded rim just inside its end, darker than C and slanting 0.3 to
    0.5 px per row, neither is the line the rows are stood upright by nor pulls C's measured slant its way:
    C keeps its depth (before, it read 0.64 of it at 0.3, a third at 0.5, or was lost)."""
    rows, length = 10, 35
    ys = np.arange(rows, dtype=np.float32)[:, None] - (rows - 1) / 2
    xs = np.arange(length, dtype=np.float32)[None, :]
    line = np.exp(-0.5 * ((xs - 0.6 * length) / 0.8) ** 2)
    plain = np.ones((rows, length, 3), np.float32) * MEMBRANE * (1 - 0.1 * line)[:, :, None]
    reader = StripReader(ReaderConfig())
    box = WindowBox(0.0, 0.0, float(length), float(rows), framed=True)
    upright = reader._lines(window_profile(plain, box, 0.002), framed=True).control
    assert upright is not None
    for centre, slant in ((31.0, 0.3), (31.0, 0.5), (29.0, 0.4)):
        rim = np.exp(-0.5 * ((xs - (centre + slant * ys)) / 0.8) ** 2)
        control = reader._lines(
            window_profile(plain * (1 - 0.25 * rim)[:, :, None], box, 0.002), True
        ).control
        assert control is not None
        assert abs(control.index - upright.index) < 0.5
        assert control.height > 0.95 * upright.height


def test_the_peak_refinement_does_not_extrapolate_off_a_slope() -> None:
    """Where the largest sample within reach is no local maximum (a slope that bends down), it is the answer:
    the parabola through 0.55, 0.45, 0.34 has its vertex beyond the samples, at 1.0."""
    values = np.array([0.55, 0.45, 0.34, 0.2])
    assert _refined_max(values, 2, 1) == 0.45
    peaked = np.array([0.1, 0.5, 0.6, 0.5, 0.1])
    assert _refined_max(peaked, 2, 1) == 0.6


def test_a_third_clear_line_does_not_bury_t_in_noise() -> None:
    """A strong band far left of the T zone (a pad's edge in a window that runs too far) stays out of T's
    noise: a 3 % T beside it is found as clearly as without it."""
    alone = _profile(_window([(C_AT, 0.5), (T_AT, 0.03)], noise=0.004))
    crowded = _profile(_window([(C_AT, 0.5), (T_AT, 0.03), (0.1, 0.2)], noise=0.004))
    test_alone = matched_test_line(alone, _control(alone), ZONE, noise_floor=0.002)
    test_crowded = matched_test_line(crowded, _control(crowded), ZONE, noise_floor=0.002)
    assert test_alone is not None
    assert test_crowded is not None
    assert abs(test_crowded.index / LENGTH - T_AT) < 0.01
    assert test_crowded.snr > 0.8 * test_alone.snr


def test_a_bare_strips_rows_are_chosen_by_brightness() -> None:
    """A bare strip's box that runs onto the background above the strip: the rows averaged are the strip's
    own, all but one at each end, where a fixed trim both took in background and left out membrane."""
    image = _window([(C_AT, 0.5)], noise=0.003)
    image[:15] = 0.25  # background: the box's top quarter
    box = WindowBox(0.0, 0.0, float(LENGTH), float(HEIGHT), framed=False)
    assert _bright_rows(image, box) == (16, HEIGHT - 1)


def test_rows_with_a_dark_patch_are_left_out() -> None:
    """Rows of which a stretch is darker than their column's median (background bled in along part of an
    edge) are left out, however bright the rest of them; lines, dark in every row, leave all rows in."""
    image = _window([(C_AT, 0.5), (T_AT, 0.1)], noise=0.003)
    assert _clean_rows(image) == (0, HEIGHT)
    image[:8, 100:112] *= 0.6
    assert _clean_rows(image) == (8, HEIGHT)
    box = WindowBox(0.0, 0.0, float(LENGTH), float(HEIGHT), framed=False)
    assert window_profile(image, box, noise_floor=0.002).rows == (8, HEIGHT - 1)


def test_a_slanting_strong_line_keeps_every_membrane_row() -> None:
    """A strong C that drifts 0.15 columns per row (9 columns over the window) darkens a stretch of every row
    away from its column's median; with the line stood upright first, no row reads as holding a dark patch,
    and the profile averages all of them but the outermost (it once kept 3 of a bare strip's 52)."""
    image = _window([(C_AT, 0.8), (T_AT, 0.05)], slope=0.15, width=10.0, noise=0.003)
    box = WindowBox(0.0, 0.0, float(LENGTH), float(HEIGHT), framed=False)
    assert _clean_rows(image) != (0, HEIGHT)  # as it stands, the slanting line looks like a patch
    assert window_profile(image, box, noise_floor=0.002).rows == (1, HEIGHT - 1)


def test_a_box_that_runs_past_the_crop_keeps_to_its_rows() -> None:
    """A window box taller than the crop (rows -10 to 50 of 40) judges the rows by the crop's own: the dark
    background along the crop's bottom stays out (a negative row once indexed from the bottom instead)."""
    image = np.full((40, 200, 3), 0.9, np.float32)
    image[36:] = 0.2
    box = WindowBox(0.0, -10.0, 200.0, 50.0, framed=True)
    assert _bright_rows(image, box) == (1, 35)


def test_a_weak_control_line_is_found_with_a_clear_test_line_as_template() -> None:
    """A 2 % C beside a 40 % T in 1 % pixel noise, which the plain peak threshold (out of reach here) does not
    pass, is found with T as the matched filter's template at the lines' spacing: POSITIVE, not INVALID."""
    profile = _profile(_window([(C_AT, 0.02), (T_AT, 0.4)], noise=0.01))
    reader = StripReader(ReaderConfig(c_min_intensity=0.01, c_min_snr=1000.0, c_min_snr_beside_test=6.0))
    plain = reader._lines(profile, framed=True)
    assert plain.control is not None
    assert abs(plain.control.index / LENGTH - C_AT) < 0.01
    assert plain.test is not None
    assert abs(plain.test.index / LENGTH - T_AT) < 0.01
    assert plain.matched_c_snr > 6.0
    # Without that path (its threshold out of reach), the same profile has no control line.
    strict = StripReader(ReaderConfig(c_min_intensity=0.01, c_min_snr=1000.0, c_min_snr_beside_test=1000.0))
    assert strict._lines(profile, framed=True).control is None


def test_a_clear_test_line_alone_finds_no_control_line_in_noise() -> None:
    """Where there is no C at all, the search with T as template finds nothing near the threshold."""
    profile = _profile(_window([(T_AT, 0.4)], noise=0.01))
    lines = StripReader()._lines(profile, framed=True)
    assert lines.control is None
    assert 0.0 < lines.matched_c_snr < 4.0


def test_a_moderate_test_line_is_template_enough(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1.6 % T (SNR about 8, under the bar of a clear line) still finds a 1.2 % C beside it in 1 % noise; with
    the template's bar raised to SNR 10, the same profile has no control line."""
    profile = _profile(_window([(C_AT, 0.012), (T_AT, 0.016)], noise=0.01))
    reader = StripReader(ReaderConfig(c_min_intensity=0.01, c_min_snr=1000.0, t_min_intensity=0.001))
    lines = reader._lines(profile, framed=True)
    assert lines.test_candidate is not None
    assert 6.0 <= lines.test_candidate.snr < 10.0
    assert lines.control is not None
    assert abs(lines.control.index / LENGTH - C_AT) < 0.01
    monkeypatch.setattr(reader_module, "TEMPLATE_LINE_SNR", 10.0)
    assert reader._lines(profile, framed=True).control is None
