"""From the rectified strip crop to line candidates: read window, background-corrected profile, peaks.

The crop has the flow axis horizontal, sample end left. A cassette's read window is found from its recessed
edge: the window's top and bottom borders are the strongest horizontal edges in the crop, and lines (vertical)
add nothing to them; the columns over which both borders are strong give the window's length. A bare strip
has no such borders; its membrane lies between the sample pad and the wick, found as the sharpest steps of
the profile's upper envelope (or, where a step does not show, from the pads' fibres or the strip's usual
proportions).

The profile averages the window's rows (all but a tenth at each border) per channel, after shearing the rows
so that the strongest line stands upright (perspective and a slightly wrong angle tilt lines by up to several
pixels over the window's height). Its background is the upper envelope (a morphological closing wider than
any line, which keeps steps such as shadow edges but fills dips), so each channel's absorbance
``1 - profile / envelope`` is 0 on the membrane whatever its colour, light or cast, and a line's peak
absorbance is its contrast against the membrane. T is then searched with C as a zero-mean matched filter
(``matched_test_line``), its noise taken from the filter's output on the profile with both lines bridged
over and from the difference of the even and odd rows (pixel noise without any line), and its signal-to-noise
ratio discounted when the filter's response per channel does not point along C's colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[Any]  # OpenCV returns loosely typed arrays


# T is searched this far left of C, as fractions of the window: the spacing is 20-35 %; on the train split
# the measured spacing of clear positives spans 0.194-0.359, and the true lines' places in 2989 cached
# windows 0.190-0.354. Each side keeps 1-1.5 points of slack: right beside C a JPEG smears C's colour over
# its 16-pixel chroma blocks (of the 26 false test lines over SNR 3.5 on 1975 train negatives, 6 lay at
# 0.16-0.175, and no T found on 1493 train positives did); out to 0.40, the far side's extra trials raised
# the false lines that set a cassette's threshold (3.50 against 3.17 at 0.37, on cached train windows, where
# 594 of 743 faint test lines were found against 576).
T_ZONE = (0.18, 0.37)

# C is searched here, as fractions of the window: the right half (flow runs left to right), but not the
# window's right rim, whose shading made the strongest false control lines on invalid strips. On the train
# split, 99.9 % of clear control lines lie at 0.53-0.79.
C_ZONE = (0.5, 0.82)


@dataclass(frozen=True)
class WindowBox:
    """The read window in crop pixels."""

    x0: float
    y0: float
    x1: float
    y1: float
    framed: bool
    """True when a recessed frame (a cassette's window) was found, False for a bare strip's membrane."""

    strength: float = 0.0
    """Summed edge strength of a frame's borders (to choose among candidate frames)."""


@dataclass(frozen=True)
class Peak:
    """A dip of the profile: a line candidate."""

    index: float
    """Sub-pixel position along the window's profile."""

    height: float
    """Peak absorbance in the most affected channel: the contrast against the membrane."""

    snr: float
    """Height over the profile's noise."""

    chroma: float
    """How coloured the dip is: 0 for grey (a shadow, a crease), about 0.5-0.9 for red or blue lines."""


@dataclass(frozen=True)
class Profile:
    """The background-corrected profile of a window."""

    signal: FloatArray
    """Absorbance, max over channels, per column of the window."""

    noise: float
    """Robust standard deviation of ``signal`` away from lines."""

    level_ratio: float
    """Brightest over darkest envelope value (uneven light across the window)."""

    peaks: tuple[Peak, ...]

    absorb: FloatArray
    """Absorbance per column and channel, shape (n, channels)."""

    split_noise: FloatArray
    """Half the difference of the even rows' and the odd rows' absorbance, shape (n, channels): the same
    pixel noise as ``absorb`` but no line, so it measures how noisy the profile is even where lines are."""

    membrane_level: FloatArray
    """The membrane's brightness per channel (median of its background), shape (channels,); a channel near 1
    is clipped, and hides a faint line that a strong one still shows."""

    rows: tuple[int, int] = (0, 0)
    """The crop's rows averaged, as (first, stop)."""


@dataclass(frozen=True)
class MatchedLine:
    """The best test-line candidate found with the control line as template."""

    index: float
    height: float
    """Contrast of the candidate in C's most affected channel, from the matched filter."""

    snr: float
    """Signal-to-noise ratio, discounted by ``colour_match``."""

    colour_match: float = 1.0
    """How well the candidate's colour matches C's: 1 alike (or a grey image), 0 for another colour."""


def line_width(signal: FloatArray, index: float) -> float:
    """Full width at half maximum of the dip at ``index``, in samples."""
    i = round(index)
    half = float(signal[i]) / 2
    left = i
    while left > 0 and signal[left] > half:
        left -= 1
    right = i
    while right < signal.size - 1 and signal[right] > half:
        right += 1
    return float(max(1, right - left))


# A line this many deviations of the profile's noise above it is plainly a line (the control line's threshold is
# about as high).
CLEAR_LINE_SNR = 10.0


def matched_test_line(
    profile: Profile, control: Peak, zone: tuple[float, float], noise_floor: float
) -> MatchedLine | None:
    """Searches ``zone`` (fractions of the window) for a line of C's colour and shape.

    The filter does not care which line is the template: with T as ``control``, it looks for a weak C
    (``StripReader._control_beside`` in ``reader``).

    T and C are made of the same particles and striped alike, so C is the best template for T: the channel
    absorbances are projected on C's colour, then correlated with C's own profile. Both raise the faint
    line's signal over the noise far more than a per-channel maximum does. The template is made zero-mean
    over flanks as wide as the line on each side, so a slope or a step of the background (a shadow edge, a
    lighting gradient) does not read as a line, and T and C are measured by the very same filter: T's height
    is its amplitude relative to C's, in C's contrast, so ``t_to_c_ratio`` compares like with like. The
    projection still passes a dip of another colour (a grey one reads 1.3 times its depth on a red C's
    colour, which absorbs 0.35, 1 and 0.6), so the candidate's own colour is checked too (``_colour_match``).
    """
    absorb = profile.absorb
    n = absorb.shape[0]
    ci = round(control.index)
    colour = absorb[ci].astype(np.float64)
    top = float(colour.max())
    if top <= 0:
        return None
    weights = np.clip(colour / top, 0.0, None)
    # Projection scaled so that a line of C's colour with contrast k reads k.
    projected = (absorb.astype(np.float64) @ weights) / float(weights @ weights)
    fwhm = line_width(profile.signal, control.index)
    half = max(1, round(1.2 * fwhm))
    lo, hi = max(0, ci - half), min(n, ci + half + 1)
    core = projected[lo:hi].copy()
    core -= min(0.0, float(core.min()))
    peak = float(core.max())
    if peak <= 0 or core.size < 2:
        return None
    core /= peak
    flank = max(2, half)
    template = np.concatenate([np.zeros(flank), core, np.zeros(flank)])
    zero_mean = template - float(template.mean())
    gain = float(template @ zero_mean)
    if gain <= 0:
        return None
    response = np.correlate(projected, zero_mean, mode="same") / gain
    reach_c = half + flank
    c_amp = _refined_max(response, ci, max(1, half // 2))
    # For T, C is bridged over by a straight line between its sides: in a short window C would otherwise
    # sit in the flanks of a T candidate and take away from its response. The filter runs once per channel:
    # the projection's response is their weighted sum (filter and bridge are linear), and the colour check
    # reads the channels' own.
    channels = np.stack(
        [
            np.correlate(_bridge(absorb[:, c].astype(np.float64), lo, hi), zero_mean, mode="same") / gain
            for c in range(absorb.shape[1])
        ],
        axis=1,
    )
    response = (channels @ weights) / float(weights @ weights)
    bridged = _bridge(projected, lo, hi)
    if c_amp <= 0:
        return None
    # The window's rim, smeared by the filter, stays out of both the search and the noise estimate.
    margin = int(0.04 * n + 2) + reach_c
    a, b = int(zone[0] * n), int(zone[1] * n) + 1
    a, b = max(a, margin), min(b, n - margin)
    if b - a < 1:
        return None
    j = a + int(np.argmax(response[a:b]))
    # The noise is read away from the lines' cores, from the filter run on the profile with the candidate
    # bridged over too: a line's response has side lobes as wide as the whole template, which, in a short
    # window, were most of the samples left beside both lines, so a strong T raised its own noise (an 8.5 %
    # T in an 80-pixel window read SNR 4.2). Bridged, neither line is in the samples, and more samples
    # remain.
    # Beside it, the noise of the same filter run on the split-half difference, which holds the pixel
    # noise but no line (a short window may leave too few samples away from both lines); lines still leak
    # into it a little (a slight tilt left), so it is read away from them too where the window allows.
    split = (profile.split_noise.astype(np.float64) @ weights) / float(weights @ weights)
    split_response = np.correlate(split, zero_mean, mode="same") / gain
    keep = np.ones(n, bool)
    for centre_index in (ci, j):
        keep[max(0, centre_index - half) : centre_index + half + 1] = False
    # Any other line as clear as a control line (a third band, a pad's edge in a window that runs too far)
    # stays out with its side lobes: its response, read as noise, buried a 6 % T at SNR 3.9 (16 without).
    for other in profile.peaks:
        k = round(other.index)
        if other.snr >= CLEAR_LINE_SNR and min(abs(k - ci), abs(k - j)) > 2 * half:
            keep[max(0, k - 2 * half) : k + 2 * half + 1] = False
    keep[:margin] = False
    keep[n - margin :] = False
    inner = split_response[keep] if keep.sum() >= 8 else split_response[margin : max(margin + 1, n - margin)]
    noise = max(noise_floor, _robust_sigma(inner))
    centre = 0.0
    if keep.sum() >= 8:
        centre = float(np.median(response[keep]))
        background = np.correlate(_bridge(bridged, j - half, j + half + 1), zero_mean, mode="same") / gain
        rest = background[keep]
        # The root mean square, not a robust spread: the structure that makes false lines (a JPEG's
        # 8-pixel blocks, whose levels all rows share) is sparse bumps of a line's width, which a median
        # of deviations passes over and the split-half difference does not hold.
        noise = max(noise, float(np.sqrt(np.mean((rest - float(np.median(rest))) ** 2))))
    amplitude = _refined_max(response, j, 1) - centre
    match = _colour_match(profile, colour, channels, j, keep)
    snr = amplitude / noise * match
    # T's strength in C's contrast: both come out of the same filter, so their ratio compares like with like.
    return MatchedLine(
        index=float(j), height=amplitude / (c_amp - centre) * control.height, snr=snr, colour_match=match
    )


# A test line's colour, as the filter's response per channel, must point along C's: below this cosine the
# candidate counts as no line at all, from COLOUR_FULL up it counts whole, linearly in between. The false test
# lines of train negatives are often of another colour (a grey shadow's curvature, a JPEG block's chroma):
# among those with SNR 3.5-8, a quarter lay under 0.71 and half under 0.90, against 5 % under 0.85 and half
# under 0.976 for true lines. (Ramps starting at 0.6-0.75 found faint lines alike; 0.8 and up, fewer.)
COLOUR_NONE = 0.7
COLOUR_FULL = 0.95
# A channel whose membrane is this bright is clipped: a strong C still darkens it, a faint T may not, so the
# two colours differ there (a 9.6 % blue T beside a 50 % C on a membrane of 0.98 in red read a cosine of 0.1).
CLIPPED_LEVEL = 0.96


def _colour_match(
    profile: Profile,
    colour: FloatArray,
    channels: FloatArray,
    j: int,
    keep: npt.NDArray[np.bool_],
) -> float:
    """How well the test candidate at ``j`` has C's colour, 0..1, from the filter's response per channel
    (``channels``, (n, channels)) over the channels that are not clipped (1 where fewer than two remain: one
    channel, grey, says nothing about colour)."""
    levels = profile.membrane_level
    usable = [c for c in range(levels.size) if levels[c] < CLIPPED_LEVEL]
    if len(usable) < 2:
        return 1.0
    filtered = channels[:, usable]
    centre = np.median(filtered[keep], axis=0) if keep.sum() >= 8 else np.zeros(len(usable))
    response = filtered[j] - centre
    colour = colour[usable]
    norm = float(np.linalg.norm(response) * np.linalg.norm(colour))
    if norm <= 0:
        return 0.0
    cosine = max(0.0, float(response @ colour)) / norm
    return min(1.0, max(0.0, (cosine - COLOUR_NONE) / (COLOUR_FULL - COLOUR_NONE)))


def _robust_sigma(values: FloatArray) -> float:
    """The standard deviation that the median absolute deviation implies for Gaussian noise: lines and steps,
    a few samples among many, do not raise it."""
    return 1.4826 * float(np.median(np.abs(values - np.median(values))))


def _bridge(values: FloatArray, lo: int, hi: int) -> FloatArray:
    """``values`` with samples ``lo .. hi - 1`` replaced by the straight line between their neighbours."""
    n = values.size
    left, right = max(0, lo - 1), min(n - 1, hi)
    bridged = values.copy()
    bridged[left : right + 1] = np.linspace(values[left], values[right], right - left + 1)
    return bridged


def _refined_max(values: FloatArray, index: int, reach: int) -> float:
    """The largest value within ``reach`` of ``index``, refined by the parabola through its neighbours where
    it is a local maximum (on a slope, the parabola's vertex lies beyond the samples: at a zone's edge, a
    response of 0.45 % on a flat slope read 1.8 %)."""
    lo, hi = max(0, index - reach), min(values.size, index + reach + 1)
    i = lo + int(np.argmax(values[lo:hi]))
    if i <= 0 or i >= values.size - 1:
        return float(values[i])
    a, b, c = float(values[i - 1]), float(values[i]), float(values[i + 1])
    if a > b or c > b:
        return b
    denom = a - 2 * b + c
    return b - 0.125 * (a - c) ** 2 / denom if denom < 0 else b


def _smooth_rows(grey: FloatArray) -> FloatArray:
    return cv2.GaussianBlur(grey, (0, 0), 1.0)


def find_window(grey: FloatArray, across_margin: float) -> WindowBox:
    """The read window of a crop whose object spans rows ``margin .. height - margin``."""
    height, _width = grey.shape
    top_obj = across_margin
    bottom_obj = height - across_margin
    obj_h = bottom_obj - top_obj
    framed = _framed_window(grey, top_obj, bottom_obj)
    if framed is not None:
        return framed
    # Bare strip: the membrane between pad and wick, over the central rows.
    y0 = top_obj + 0.2 * obj_h
    y1 = bottom_obj - 0.2 * obj_h
    band = grey[int(y0) : int(np.ceil(y1)), :]
    profile = band.mean(axis=0)
    lo, hi = _strip_extent(grey, top_obj, bottom_obj, profile)
    envelope = _closing(profile, max(3, int(0.06 * (hi - lo)) | 1))  # wider than any line
    # The lines lie on the membrane, well inside it: the wick never begins just before a line, nor does the
    # sample pad end just after one, whether a border is seen in brightness or in texture.
    lines = _near_lines(profile, envelope, lo, hi)
    x0, x1 = _membrane_span(envelope, lo, hi, lines)
    if x0 <= lo or x1 >= hi:
        # A shadow or a light gradient can hide a brightness step; the pads' fibres still show.
        x0, x1 = _fibre_span(band, x0, x1, lo, hi, lines)
    # Where neither brightness nor texture shows an end, the strip's proportions place it: the whole strip as
    # the window put the wick's edge in C's place and C in T's (false test lines of SNR 14-63 on train negatives).
    length = hi - lo
    if x1 >= hi:
        x1 = min(float(hi), x0 + (MEMBRANE_SHARE if x0 > lo else MEMBRANE_SHARE + PAD_SHARE) * length)
    if x0 <= lo and x1 < hi and x1 - lo >= PADLESS_SHARE * length:
        x0 = max(float(lo), x1 - MEMBRANE_SHARE * length)
    return WindowBox(x0, top_obj, x1, bottom_obj, framed=False)


# A bare strip's membrane and sample pad, as shares of its length (a strip of 60-80 mm: pad 15-20 mm, membrane
# about 25-35 mm; the generator draws 0.2-0.28 and 0.42-0.5).
MEMBRANE_SHARE = 0.46
PAD_SHARE = 0.24
# Where the wick's border lies closer than this to the strip's start as seen, no sample pad lies before the
# membrane: with a pad of at least 0.2 of the strip in front, the border lies 0.62 of the way or further; seen
# without its pad (too dim beside the background to count as strip), 0.53-0.69. A strong C was otherwise left
# out of a window placed by proportion (train seed 488: the membrane began where the pad ended, at the start).
PADLESS_SHARE = 0.6


# A crop column shows the strip when its middle rows are this much brighter than the rows beside the strip
# (the background in the crop's margins): a strip's pad is about 0.7 bright or more before light, the scene at
# most 0.55 (see the generator). Lower ratios took background for strip: the object's drop shadow darkens
# the margins beside it more than the background beyond its end (0.32 beside it, 0.37 beyond).
STRIP_OVER_BACKGROUND = 1.4
# ... over this many columns in a row: where the crop starts or ends past the strip's own end.
STRIP_RUN = 5


def _strip_extent(
    grey: FloatArray, top_obj: float, bottom_obj: float, profile: FloatArray
) -> tuple[int, int]:
    """Columns ``lo .. hi`` of the crop that show the strip: the locator may take in a piece of background
    beyond an end of the strip (a shadow beside it can lengthen it), whose step up to the strip is sharper
    than the pad's step to the membrane and was taken for it."""
    n = profile.size
    top, bottom = int(top_obj), int(np.ceil(bottom_obj))
    beside = [rows.mean(axis=0) for rows in (grey[:top], grey[bottom:]) if rows.shape[0] > 0]
    if not beside or n < 4 * STRIP_RUN:
        return 0, n
    # The darker side: where a margin catches part of the strip, the other side still shows background.
    background = np.minimum.reduce(beside)
    on = (profile > STRIP_OVER_BACKGROUND * background).astype(np.uint8)
    # Columns that start a run of STRIP_RUN strip columns.
    runs = np.flatnonzero(np.convolve(on, np.ones(STRIP_RUN, np.uint8), mode="valid") == STRIP_RUN)
    if runs.size == 0:
        return 0, n
    lo = int(runs[0]) if runs[0] < 0.3 * n else 0
    last = int(runs[-1]) + STRIP_RUN
    hi = last if last > 0.7 * n else n
    return lo, hi


# Texture steps: the fibrous pad and wick must vary across the rows this many times more than the membrane.
FIBRE_RATIO = 1.6


def _fibre_span(
    band: FloatArray, x0: float, x1: float, lo: int, hi: int, lines: NearLines
) -> tuple[float, float]:
    """The membrane's ends where its brightness steps were not found, from texture: the sample pad and the
    wick are fibrous (streaks along the strip, so their columns vary across the rows), the membrane is smooth.

    Each column's spread across the rows is taken after smoothing along the strip (pixel noise averages out,
    streaks do not), as the spread of its row-to-row steps: a shadow edge that crosses the strip at a slant
    ramps smoothly across the rows and would otherwise pass for fibres. Then a running median wider than any
    line (a line's own unevenness must not count). As in brightness, the wick is not looked for just before a
    line, nor the pad's end just after one (``lines``): where JPEG noise grows with the light along the strip,
    texture rises slowly over the whole membrane, and a 1224-pixel strip's window ended at C; where it falls
    along the strip, a 795-pixel strip's window began past C."""
    rows, n = band.shape
    if rows < 4 or n < 40:
        return x0, x1
    smooth = cv2.blur(np.ascontiguousarray(band, dtype=np.float32), (5, 1), borderType=cv2.BORDER_REPLICATE)
    level = np.maximum(smooth.mean(axis=0), 1e-3)
    spread = np.diff(smooth, axis=0).std(axis=0) / level
    reach = max(3, int(0.04 * n))
    texture = _running_median(spread, 2 * reach + 1)
    log_tex = np.log(np.maximum(texture, 1e-5))
    # Step strength at x: texture just beyond x over texture just before it.
    padded = np.concatenate([np.full(reach, log_tex[0]), log_tex, np.full(reach, log_tex[-1])])
    before = padded[:n]
    after = padded[2 * reach : 2 * reach + n]
    rise = after - before
    threshold = float(np.log(FIBRE_RATIO))
    length = hi - lo
    # As for brightness, a step must peak inside its zone: the strip's own end, smeared into the zone's edge by
    # the running median, was taken for the wick.
    # The running median places a texture step only to within its reach, so a line that much further off
    # counts too.
    if x0 <= lo:
        near_line = _any_within(lines.behind, reach, backward=True)
        step = _strongest_step(-rise, lo + int(0.04 * length), lo + int(0.42 * length), threshold, near_line)
        x0 = x0 if step is None else float(step)
    if x1 >= hi:
        near_line = _any_within(lines.ahead, reach)
        step = _strongest_step(rise, int(x0 + 0.25 * length), lo + int(0.96 * length), threshold, near_line)
        x1 = x1 if step is None else float(step)
    return x0, x1


def _running_median(values: FloatArray, size: int) -> FloatArray:
    """Median of each ``size``-sample neighbourhood (edges replicated)."""
    half = size // 2
    padded = np.concatenate([np.full(half, values[0]), values, np.full(half, values[-1])])
    windows = np.lib.stride_tricks.sliding_window_view(padded, size)
    return np.asarray(np.median(windows, axis=1), dtype=np.float32)


def _framed_window(grey: FloatArray, top_obj: float, bottom_obj: float) -> WindowBox | None:
    _height, width = grey.shape
    obj_h = bottom_obj - top_obj
    smooth = _smooth_rows(grey)
    grad = np.abs(smooth[2:, :] - smooth[:-2, :])  # row y+1 of the crop
    # Only the object's inner columns and rows, away from its own outline.
    cols = slice(int(0.03 * width), int(0.97 * width))
    # The 90th percentile of each row (the order statistic: a partition is several times quicker than
    # np.percentile's interpolation along an axis).
    inner = grad[:, cols]
    rows_strength = np.partition(inner, int(0.9 * (inner.shape[1] - 1)), axis=1)[
        :, int(0.9 * (inner.shape[1] - 1))
    ]
    first = int(top_obj + 0.24 * obj_h)
    last = int(bottom_obj - 0.24 * obj_h)
    centre = int((top_obj + bottom_obj) / 2)
    if last - first < 6:
        return None
    body = rows_strength[max(0, int(top_obj) + 1) : max(int(top_obj) + 2, int(bottom_obj) - 2)]
    floor = float(np.percentile(body, 25)) + 1e-3
    tops = _row_peaks(rows_strength, first, centre, 2.0 * floor)
    bottoms = _row_peaks(rows_strength, centre, last, 2.0 * floor)
    # Several horizontal edges compete (the window's borders, the sample well's rim): the window is the
    # pair of borders that is strongest summed over the run of columns where both are strong.
    best: WindowBox | None = None
    for top in tops:
        for bottom in bottoms:
            box = _frame_between(grad, top, bottom, width, obj_h)
            if box is not None and (best is None or box.strength > best.strength):
                best = box
    return best


def _row_peaks(strength: FloatArray, lo: int, hi: int, minimum: float) -> list[int]:
    """Rows (indices into the crop) of the three strongest local maxima of ``strength[lo-1 : hi-1]``."""
    rows = []
    for y in range(max(lo, 1), min(hi, strength.size)):
        v = float(strength[y - 1])
        left = float(strength[y - 2]) if y >= 2 else -1.0
        right = float(strength[y]) if y < strength.size else -1.0
        if v >= minimum and v >= left and v >= right:
            rows.append((v, y))
    return [y for _, y in sorted(rows, reverse=True)[:3]]


def _frame_between(grad: FloatArray, top: int, bottom: int, width: int, obj_h: float) -> WindowBox | None:
    band_t = grad[max(0, top - 3) : top + 2, :].max(axis=0)
    band_b = grad[max(0, bottom - 3) : bottom + 2, :].max(axis=0)
    both = cv2.blur(np.minimum(band_t, band_b).reshape(1, -1), (5, 1)).ravel()
    both[: int(0.03 * width)] = 0
    both[int(0.97 * width) :] = 0
    threshold = 0.35 * float(np.percentile(both, 97))
    strong = (both > threshold).astype(np.uint8).reshape(1, -1)
    # A dark line under the border weakens its edge; bridge gaps up to a line's width.
    gap = max(3, int(0.03 * width) | 1)
    strong = cv2.morphologyEx(strong, cv2.MORPH_CLOSE, np.ones((1, gap), np.uint8))
    run = _longest_run(strong.ravel() > 0)
    if run is None:
        return None
    x0, x1 = run
    win_h = bottom - top
    strength = float(both[x0:x1].sum())
    # A cassette's window is a fraction of its length and height; the strip's own outline is not a window.
    if not 0.12 * width <= x1 - x0 <= 0.62 * width or not 0.12 * obj_h <= win_h <= 0.6 * obj_h:
        return None
    if (x1 - x0) < 1.2 * win_h:
        return None
    return WindowBox(float(x0), float(top), float(x1), float(bottom), framed=True, strength=strength)


def _longest_run(flags: npt.NDArray[np.bool_]) -> tuple[int, int] | None:
    if not flags.any():
        return None
    padded = np.concatenate([[False], flags, [False]]).astype(np.int8)
    diff = np.diff(padded)
    starts = np.flatnonzero(diff == 1)
    ends = np.flatnonzero(diff == -1)
    lengths = ends - starts
    i = int(np.argmax(lengths))
    return int(starts[i]), int(ends[i])


# A line this deep under the envelope (and six times the profile's spread) is a line, not a step's noise: C,
# whose edge a falling light made look like the wick's border (0.04 passed over one or two true borders more on
# train bare strips).
LINE_DEPTH = 0.08


def _membrane_span(envelope: FloatArray, lo: int, hi: int, lines: NearLines) -> tuple[float, float]:
    """Sample pad / membrane and membrane / wick borders of a bare strip whose columns ``lo .. hi`` show the
    strip: the sharpest steps of the profile's ``envelope`` (a closing wider than any line; ``lo`` and ``hi``
    where none shows); neither border is looked for right beside a line (``lines``)."""
    n = envelope.size
    length = hi - lo
    sigma = max(1.0, 0.004 * length)
    env = cv2.GaussianBlur(envelope.reshape(1, -1), (0, 0), sigma).ravel()
    # Steps relative to the local level, so that a light gradient along the strip does not hide them.
    slope = np.gradient(np.log(np.maximum(env, 1e-3)))
    least = 0.025 / (sigma * 2.5)
    # Each zone reaches a little further inwards than the step may lie, so that a step just past it still
    # shows as a peak; the zone's outer edge does not, so the tail of a step beyond it (the strip's own end)
    # is no peak.
    slack = int(0.06 * length)
    x0, x1 = float(lo), float(hi)
    left = _strongest_step(
        slope, lo + int(0.04 * length), lo + int(0.42 * length) + slack, least, lines.behind
    )
    if left is not None:
        x0 = float(left)
    # The membrane is at least a quarter of the strip long.
    stop = min(n, lo + int(0.92 * length))
    # Where the light falls off across C (a shadow's edge, a gradient), the closing fills C only up to its
    # lower, right shoulder, so the envelope steps down at C's left edge, and C was taken for the wick's border.
    # The wick never begins just before a line, so such a step is passed over.
    right = _strongest_step(-slope, int(x0 + 0.25 * length) - slack, stop, least, lines.ahead)
    if right is not None:
        x1 = float(right)
    return x0, x1


@dataclass(frozen=True)
class NearLines:
    """Per sample of a bare strip's profile: whether a strong line lies close after it or close before it."""

    ahead: npt.NDArray[np.bool_]
    behind: npt.NDArray[np.bool_]


def _near_lines(profile: FloatArray, envelope: FloatArray, lo: int, hi: int) -> NearLines:
    """Whether a strong line (a dip under the ``envelope`` of LINE_DEPTH, or six times the profile's spread
    beneath it if that is more) lies within a twentieth of the strip (columns ``lo .. hi``) after each sample,
    and before it."""
    reach = int(0.05 * (hi - lo)) + 1
    ratio = profile / np.maximum(envelope, 1e-3)
    inner = ratio[lo:hi] if hi - lo > 8 else ratio
    spread = _robust_sigma(inner)
    deep = 1.0 - ratio > max(LINE_DEPTH, 6.0 * spread)
    ahead = _any_within(np.concatenate([deep[1:], [False]]), reach)
    behind = _any_within(np.concatenate([[False], deep[:-1]]), reach, backward=True)
    return NearLines(ahead=ahead, behind=behind)


def _any_within(flags: npt.NDArray[np.bool_], reach: int, backward: bool = False) -> npt.NDArray[np.bool_]:
    """Whether any of the ``reach`` samples from each one on (``backward``: up to each one) is set in
    ``flags``."""
    if backward:
        return _any_within(flags[::-1], reach)[::-1]
    padded = np.concatenate([flags, np.zeros(reach, bool)]).astype(np.uint8).reshape(1, -1)
    # A dilation anchored at the kernel's start: the maximum over the ``reach`` samples from each one on.
    found = cv2.dilate(padded, np.ones((1, reach), np.uint8), anchor=(0, 0)).ravel()[: flags.size]
    return np.asarray(found > 0)


def _strongest_step(
    slope: FloatArray, start: int, stop: int, least: float, excluded: npt.NDArray[np.bool_] | None = None
) -> int | None:
    """The largest local maximum of ``slope`` in ``start .. stop`` over ``least``, except where ``excluded``:
    a value at the zone's edge that only continues a larger step outside it is no step, and neither is the
    flank of an excluded one."""
    n = slope.size
    start, stop = max(1, start), min(n - 1, stop)
    if stop <= start:
        return None
    values = slope[start:stop]
    peaks = (
        (values >= slope[start - 1 : stop - 1]) & (values >= slope[start + 1 : stop + 1]) & (values > least)
    )
    if excluded is not None:
        peaks &= ~excluded[start:stop]
    if not peaks.any():
        return None
    return start + int(np.argmax(np.where(peaks, values, -np.inf)))


def _closing(values: FloatArray, size: int) -> FloatArray:
    """Closing along the last axis of a 1-D or (rows, n) array."""
    rows = np.ascontiguousarray(values.reshape(-1, values.shape[-1]), dtype=np.float32)
    kernel = np.ones((1, size), np.uint8)
    dilated = cv2.dilate(rows, kernel, borderType=cv2.BORDER_REPLICATE)
    closed = cv2.erode(dilated, kernel, borderType=cv2.BORDER_REPLICATE)
    return np.asarray(closed, dtype=np.float32).reshape(values.shape)


# The lighting trend under the lines: a Gaussian of this many closing widths (0.2-0.5 found faint lines
# alike on the train split; 0.3 best), leaving out the columns whose absorbance over the plain closing exceeds
# TREND_LINE_ABSORBANCE (0.005 let the strongest false lines on negatives rise more).
TREND_SIGMA = 0.3
TREND_LINE_ABSORBANCE = 0.01
# Where the quotient by the trend rises this far above 1, a sharp step lies near (1 % cost faint lines on the
# train split; 2 % let a hard 6 % shadow edge through as a line).
STEP_JUMP = 0.015

# The rows inside these trims, off the window's top and bottom (a cassette's bevel and shaded rim; a bare
# strip's edges, which catch the background that blur and perspective bleed in), surely show the membrane;
# the brightest of them sets the level that the rows averaged must keep (``_bright_rows``).
ROW_TRIM = 0.1
BARE_ROW_TRIM = 0.22
ROW_LEVEL = 0.9
PATCH_SHARE = 0.02
PATCH_WIDTH = 4  # columns of the half-width grid: 7-8 pixels


def _bright_rows(crop: FloatArray, box: WindowBox) -> tuple[int, int]:
    """The window's rows that show the membrane by their brightness, as (first, stop) in the crop: the unbroken
    run around the middle whose median brightness stays within ``ROW_LEVEL`` of the brightest row inside the
    trims, less its outermost row at each end (``_clean_rows`` then leaves out rows with a dark patch).

    A fixed trim was either too wide or too narrow: a bare strip's window was off-centre on it, or its edges
    blurred in unevenly. Chosen by brightness, its rows went from 56 % to a median 83 % of its height, and its
    false test lines fell: on cached train windows, at the threshold that 0.25 % of negatives pass, 587 of 740
    faint bare-strip test lines were found against 516 (trims of 0.15 and 0.08: 558 and 433), and 576 of 743
    through cassettes' windows against 568.
    """
    h = box.y1 - box.y0
    trim = ROW_TRIM if box.framed else BARE_ROW_TRIM
    top, bottom = max(0, round(box.y0)), min(crop.shape[0], round(box.y1))
    # A box that runs past the crop keeps to its rows (a negative row would index from the bottom).
    t0 = min(max(round(box.y0 + trim * h), top), bottom - 1)
    t1 = min(max(round(box.y1 - trim * h), t0 + 1), bottom)
    x0, x1 = round(box.x0), round(box.x1)
    level = np.median(_grey_columns(crop[top:bottom, x0:x1]), axis=1)
    inner = level[t0 - top : t1 - top]
    if inner.size == 0:
        return t0, t1
    a, b = _run_around(level >= ROW_LEVEL * float(inner.max()), (t0 + t1) // 2 - top)
    a, b = a + 1, b - 1
    if b - a < 2:
        return t0, t1
    return top + a, top + b


def _clean_rows(band: FloatArray) -> tuple[int, int]:
    """Of ``band``'s rows, the unbroken run around the middle in which at most ``PATCH_SHARE`` of the columns
    fall below ``ROW_LEVEL`` of their column's median (background bled in along part of an edge), as (first,
    stop); all rows where fewer than two pass.

    A line, dark in every row, cancels out only where it stands upright: the band's lines must have been
    sheared upright first. A strong C slanting by a few columns over the rows darkened a stretch of every
    row, and a bare strip's 52 membrane rows came down to 3 (train negative seed 1).
    """
    grey = _grey_columns(band)
    ratio = cv2.blur(grey / np.maximum(np.median(grey, axis=0), 1e-3), (PATCH_WIDTH, 1))
    clean = (ratio < ROW_LEVEL).mean(axis=1) <= PATCH_SHARE
    first, stop = _run_around(clean, grey.shape[0] // 2)
    if stop - first < 2:
        return 0, grey.shape[0]
    return first, stop


def _grey_columns(window: FloatArray) -> FloatArray:
    """Every other column of ``window`` in grey: enough to tell rows' levels, at half the cost."""
    half = window[:, ::2]
    if half.ndim == 3 and half.shape[2] == 3:
        half = cv2.cvtColor(np.ascontiguousarray(half), cv2.COLOR_RGB2GRAY)
    elif half.ndim == 3:
        half = half[:, :, 0]
    return np.asarray(half, dtype=np.float32)


def _run_around(flags: npt.NDArray[np.bool_], middle: int) -> tuple[int, int]:
    """The unbroken run of True around ``middle`` (which counts in any case), as (first, stop)."""
    a, b = middle, middle + 1
    while a > 0 and flags[a - 1]:
        a -= 1
    while b < flags.size and flags[b]:
        b += 1
    return a, b


def window_profile(crop: FloatArray, box: WindowBox, noise_floor: float, margin: float = 0.04) -> Profile:
    """Background-corrected line profile of the window's rows, de-skewed; peaks sorted by position."""
    y0, y1 = _bright_rows(crop, box)
    x0, x1 = round(box.x0), round(box.x1)
    band = crop[y0:y1, x0:x1]
    if band.ndim == 2:
        band = band[:, :, None]
    band = np.ascontiguousarray(band, dtype=np.float32)
    n = band.shape[1]
    edge = max(int(margin * n), int(0.04 * n + 2))
    absorb, env, level_ratio = _absorbance(band, margin)
    # Perspective and a slightly wrong angle tilt the lines by up to several pixels over the window's
    # height, which smears a narrow line; the strongest line's tilt is measured and sheared away. Rows with
    # a dark patch are then told, with the lines upright, and left out. (Measured again without those rows,
    # the tilt moved a line by under 0.1 column over the window's height in 95 % of the 185 train windows
    # that lost rows, and by 1 column at most.)
    slope = _line_slope(band, absorb, env, edge)
    upright = _shear_rows(band, slope) if slope != 0.0 else band
    first, stop = _clean_rows(upright)
    if upright is not band or (first, stop) != (0, band.shape[0]):
        y0, y1 = y0 + first, y0 + stop
        band = np.ascontiguousarray(upright[first:stop])
        absorb, env, level_ratio = _absorbance(band, margin)
    signal = absorb.max(axis=1).astype(np.float32)
    # The window's own rim must not count as a line: skip a few pixels more than the margin at each end.
    lo, hi = edge, n - edge
    core = signal[lo:hi] if hi - lo > 8 else signal
    noise = max(noise_floor, _robust_sigma(core))
    peaks = _peaks(signal, absorb, noise, lo, hi)
    split = _split_difference(band, env)
    return Profile(
        signal=signal,
        noise=noise,
        level_ratio=level_ratio,
        peaks=peaks,
        absorb=absorb,
        split_noise=split,
        membrane_level=np.median(env, axis=0).astype(np.float32),
        rows=(y0, y1),
    )


def _split_difference(band: FloatArray, env: FloatArray) -> FloatArray:
    if band.shape[0] < 2:
        return np.zeros_like(env)
    rows = 2 * (band.shape[0] // 2)
    n = band.shape[1]
    sigma = max(0.6, 0.003 * n)
    even = _blur_columns(band[0:rows:2].mean(axis=0).astype(np.float32), sigma)
    odd = _blur_columns(band[1:rows:2].mean(axis=0).astype(np.float32), sigma)
    return np.asarray(0.5 * (odd - even) / env, dtype=np.float32)


def _absorbance(band: FloatArray, margin: float) -> tuple[FloatArray, FloatArray, float]:
    """Per-column absorbance (n, channels), its background envelope, and the envelope's max/min ratio."""
    means = band.mean(axis=0)
    n = means.shape[0]
    sigma = max(0.6, 0.003 * n)
    means = _blur_columns(means.astype(np.float32), sigma)
    k = max(5, int(0.1 * n) | 1)
    absorb = np.empty_like(means)
    envelope = np.empty_like(means)
    level_ratio = 1.0
    background = _membrane_background(means, k)
    for c in range(means.shape[1]):
        closed = background[:, c]
        # Smoothing lowers the max filter's noise bias; taking the minimum keeps it from spilling over a
        # step (a shadow edge, a pad border) onto the darker side, where it would fake half a line.
        smoothed = cv2.blur(
            closed.reshape(1, -1), (max(1, k // 3), 1), borderType=cv2.BORDER_REPLICATE
        ).ravel()
        env = np.maximum(np.minimum(closed, smoothed), 1e-3)
        envelope[:, c] = env
        absorb[:, c] = 1.0 - means[:, c] / env
        inner = env[int(margin * n) : max(int(margin * n) + 1, int((1 - margin) * n))]
        level_ratio = max(level_ratio, float(inner.max() / max(inner.min(), 1e-3)))
    return absorb, envelope, level_ratio


def _membrane_background(means: FloatArray, size: int) -> FloatArray:
    """The membrane's brightness under the lines, per column and channel (``means``: (n, channels)).

    A closing alone fills a dip on a slope only up to its lower shoulder, so a line on a lighting gradient or
    a shadow's penumbra loses the slope times its width of its depth: most of a faint T's. So the lighting
    trend is divided out first (a Gaussian average that leaves out the lines the plain closing sees) and the
    quotient is closed. Beside a sharp step, which the trend smooths over, the plain closing is kept. (A
    second pass with the lines this one finds, or a local linear trend, raised the strongest false lines on
    train negatives more than faint lines.)
    """
    rows = np.ascontiguousarray(means.T, dtype=np.float32)
    closed = _closing(rows, size)
    seen = (1.0 - rows / np.maximum(closed, 1e-3) < TREND_LINE_ABSORBANCE).astype(np.float32)
    # Leave out a line's shoulders too, where the closing meets it.
    membrane: FloatArray = cv2.erode(seen, np.ones((1, 5), np.uint8), borderType=cv2.BORDER_REPLICATE)
    sigma = TREND_SIGMA * size
    weight = _blur_rows(membrane, sigma)
    total = _blur_rows(rows * membrane, sigma)
    trend = np.maximum(np.where(weight > 1e-3, total / np.maximum(weight, 1e-3), closed), 1e-3)
    quotient = rows / trend
    flattened = _closing(quotient, size) * trend
    # A trend smooths a sharp step (a hard shadow edge) over, and the closing of the quotient then lifts the
    # darker side into a broad false dip; beside such a step the plain closing, which follows it, is kept.
    # Such a step shows as the quotient rising well above 1 on its bright side (lines only dip).
    steep = (quotient.max(axis=0, keepdims=True) > 1.0 + STEP_JUMP).astype(np.float32)
    near = cv2.dilate(steep, np.ones((1, 2 * math.ceil(3 * sigma) + 1), np.uint8))
    plain_weight = np.clip(_blur_rows(near, sigma) * 2.0, 0.0, 1.0)
    return np.ascontiguousarray((plain_weight * closed + (1.0 - plain_weight) * flattened).T)


def _blur_rows(values: FloatArray, sigma: float) -> FloatArray:
    """Gaussian smoothing along each row; zeros beyond the ends, so that a weight's blur says how much of
    the kernel had data."""
    size = 2 * math.ceil(3 * sigma) + 1
    out = cv2.GaussianBlur(values, (size, 1), sigmaX=sigma, sigmaY=0, borderType=cv2.BORDER_CONSTANT)
    return np.asarray(out, dtype=np.float32)


# The steepest slant of a line across the window, in columns per row, on the train split: a bare strip is
# only 6-11 % as wide as it is long, so a few degrees of perspective shear its lines by up to 0.37.
MAX_LINE_SLANT = 0.45


def _line_slope(band: FloatArray, absorb: FloatArray, env: FloatArray, edge: int) -> float:
    """Columns per row by which the strongest line drifts down the window (0 when it cannot be told).

    The line is C, looked for where C lies (``C_ZONE``; T, when there is one, runs parallel to it): a
    window's shaded rim, just inside its ends, can be darker than a weak line and runs at any slant; in a
    35-pixel window its slope of 0.65 columns per row, sheared in, flattened a 7 % control line to 1.2 %.
    """
    rows, n = band.shape[0], band.shape[1]
    signal = absorb.max(axis=1)
    first, last = max(edge, int(C_ZONE[0] * n)), min(n - edge, int(C_ZONE[1] * n) + 1)
    if rows < 8 or last - first < 3:
        return 0.0
    i = first + int(np.argmax(signal[first:last]))
    if signal[max(0, i - 1)] > signal[i] or signal[min(n - 1, i + 1)] > signal[i]:
        return 0.0  # the shoulder of something beyond the zone, not a line
    top = float(signal[i])
    core = signal[edge : n - edge]
    spread = _robust_sigma(core) + 1e-4
    if top < 0.03 or top < 15 * spread:
        return 0.0
    channel = int(np.argmax(absorb[i]))
    # The line's centre is followed within its own half width plus the drift the steepest slant seen makes
    # over half the rows, and never past twice its width: anything further off (a window's rim, another
    # line) would pull the centres its way.
    fwhm = line_width(signal, float(i))
    reach = max(3, round(min(2.0 * fwhm, fwhm / 2 + 1 + MAX_LINE_SLANT * rows / 2)))
    lo, hi = max(0, i - reach), min(n, i + reach + 1)
    bands = max(3, min(8, rows // 4))
    xs = np.arange(lo, hi, dtype=np.float64)
    centres, weights, ys = [], [], []
    for k in range(bands):
        a, b = k * rows // bands, (k + 1) * rows // bands
        values = band[a:b, lo:hi, channel].mean(axis=0)
        dip = 1.0 - values / env[lo:hi, channel]
        w = np.clip(dip - 0.4 * float(dip.max()), 0.0, None)
        total = float(w.sum())
        if total <= 0:
            continue
        centres.append(float((xs * w).sum() / total))
        weights.append(total)
        ys.append((a + b - 1) / 2)
    if len(centres) < 3:
        return 0.0
    slope, _ = np.polyfit(np.array(ys), np.array(centres), 1, w=np.sqrt(np.array(weights)))
    # Under a third of a pixel over the whole height is not worth resampling for.
    return float(slope) if abs(slope) * rows >= 0.33 else 0.0


def _shear_rows(band: FloatArray, slope: float) -> FloatArray:
    """Row y shifted by ``slope * (y - middle)`` columns, so that a line drifting by ``slope`` stands upright."""
    rows, n = band.shape[0], band.shape[1]
    middle = (rows - 1) / 2
    matrix = np.array([[1.0, slope, -slope * middle], [0.0, 1.0, 0.0]], dtype=np.float64)
    sheared = cv2.warpAffine(
        band,
        matrix,
        (n, rows),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    return np.asarray(sheared, dtype=np.float32).reshape(band.shape)


def _blur_columns(values: FloatArray, sigma: float) -> FloatArray:
    """Gaussian smoothing along axis 0 of an (n, channels) array."""
    size = 2 * int(3 * sigma) + 1
    blurred = cv2.GaussianBlur(values, (1, size), sigmaX=0, sigmaY=sigma, borderType=cv2.BORDER_REPLICATE)
    return np.asarray(blurred, dtype=np.float32).reshape(values.shape)


def _peaks(signal: FloatArray, absorb: FloatArray, noise: float, lo: int, hi: int) -> tuple[Peak, ...]:
    found: list[Peak] = []
    n = signal.size
    for i in range(max(lo, 1), min(hi, n - 1)):
        v = signal[i]
        if v <= 0 or v < signal[i - 1] or v <= signal[i + 1]:
            continue
        # Sub-pixel vertex of the parabola through the three samples.
        a, b, c = float(signal[i - 1]), float(v), float(signal[i + 1])
        denom = a - 2 * b + c
        offset = 0.5 * (a - c) / denom if denom < 0 else 0.0
        colour = absorb[i]
        top = float(colour.max())
        chroma = float((colour.max() - colour.min()) / top) if top > 1e-4 and colour.size > 1 else 0.0
        found.append(Peak(index=i + offset, height=float(v), snr=float(v) / noise, chroma=chroma))
    return tuple(found)
