"""Synthetic lateral-flow test photos with known truth, deterministic from a seed.

Every variation in STRIP_READER.md is covered: a cassette or a bare strip on varied backgrounds (or no strip at
all), membrane white to cream, sample pad left and wick right, T left of C with a spacing of 20-35 % of the read
window and lines 1-4 % of it wide, red-purple or blue lines, positives, negatives (C only) and invalids (no C,
T maybe), T strength down to about 1 % contrast, sometimes a weak C; then the photo: position and scale (strip
30-95 % of the width), rotation within +-15 degrees, slight perspective, sizes 320x240 .. 4000x3000, gradient
or vignette up to 40 %, colour cast, shadows, defocus blur up to sigma 2.5 px at 1000 px width, sensor noise,
JPEG quality down to 40 or PNG, and RGB, RGBA or grey.

A line is drawn as a transmittance: each channel of the membrane is multiplied by ``1 - contrast * absorb_c *
shape(x)``, where ``absorb`` has a maximum of 1, so ``contrast`` is the fractional drop of the most affected
channel at the line's centre: the truth's line contrast.

Splits are seed ranges: ``train`` seeds start at 0, ``heldout`` seeds at 1_000_000; calibration may use the
train split only. The class of a sample follows its seed (10 seeds hold 4 positives, 3 negatives, 2 invalids
and 1 image with no strip), so every split is stratified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from mesh.services.inference.strip.types import Verdict, Window

FloatImage = npt.NDArray[Any]  # OpenCV returns loosely typed arrays
Split = Literal["train", "heldout"]
SceneKind = Literal["cassette", "strip", "none"]

SPLIT_BASE: dict[str, int] = {"train": 0, "heldout": 1_000_000}
# Class by seed modulo 10: 4 positive, 3 negative, 2 invalid (strip without C), 1 without any strip.
CLASS_PATTERN: tuple[str, ...] = (
    "positive",
    "negative",
    "positive",
    "invalid",
    "negative",
    "positive",
    "none",
    "negative",
    "positive",
    "invalid",
)

# Absorbance per channel (R, G, B), maximum 1: colloidal gold is red-purple, latex beads are blue.
RED_PURPLE = ((0.22, 0.45), (1.0, 1.0), (0.45, 0.75))
BLUE = ((1.0, 1.0), (0.55, 0.8), (0.08, 0.3))


@dataclass(frozen=True)
class LineTruth:
    """The truth of one line."""

    present: bool
    contrast: float
    position: float
    center_x: float
    center_y: float


@dataclass(frozen=True)
class Truth:
    """What a generated image shows."""

    seed: int
    verdict: Verdict
    kind: SceneKind
    test_line: LineTruth
    control_line: LineTruth
    t_to_c: float
    window: Window | None
    width: int
    height: int
    colour_mode: Literal["rgb", "rgba", "grey"]
    image_format: Literal["png", "jpeg"]
    jpeg_quality: int
    blur_sigma_px: float
    angle_degrees: float
    line_colour: Literal["red", "blue", "none"]


@dataclass(frozen=True)
class Sample:
    """A generated photo: the encoded file, the decoded pixels a client would send, and the truth."""

    encoded: bytes
    image: npt.NDArray[np.uint8]
    truth: Truth


@dataclass(frozen=True)
class GeneratorOptions:
    """Knobs of the photo model; the defaults cover STRIP_READER.md."""

    large_fraction: float = 0.04
    """Share of images of 1920..4000 px width; the rest are 320..1280 px wide."""

    min_t_contrast: float = 0.012
    """Faintest test line of a positive."""

    faint_t_fraction: float = 0.15
    """Share of positives whose T lies between ``min_t_contrast`` and 4 % contrast."""

    weak_c_fraction: float = 0.15
    """Share of tests with C between 6 % and 20 % contrast."""

    size: tuple[int, int] | None = None
    """Fixed (width, height), e.g. 1920x1080 for latency runs; None draws a size."""


@dataclass(frozen=True)
class Overrides:
    """Fixes chosen draws of one sample (for hand-picked case sets); None keeps the random draw."""

    cls: str | None = None
    """positive, negative, invalid or none."""

    kind: Literal["cassette", "strip"] | None = None
    t_contrast: float | None = None
    c_contrast: float | None = None
    angle: float | None = None
    colour: Literal["red", "blue"] | None = None
    shadow: float | None = None
    """Strength of a shadow edge across the read window (0 for none)."""

    blur_at_1000: float | None = None
    """Defocus sigma in pixels at 1000 px width."""

    image_format: Literal["png", "jpeg"] | None = None
    jpeg_quality: int | None = None
    colour_mode: Literal["rgb", "rgba", "grey"] | None = None


def split_seeds(split: Split, count: int, start: int = 0) -> range:
    """Seeds ``start .. start+count`` of a split."""
    base = SPLIT_BASE[split]
    return range(base + start, base + start + count)


def decode(encoded: bytes) -> npt.NDArray[np.uint8]:
    """Decodes PNG/JPEG bytes to RGB, RGBA or grey uint8, as a client would send them."""
    buffer = np.frombuffer(encoded, dtype=np.uint8)
    image = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError("undecodable image")
    if image.ndim == 3 and image.shape[2] == 3:
        return np.ascontiguousarray(image[:, :, ::-1])
    if image.ndim == 3 and image.shape[2] == 4:
        return np.ascontiguousarray(image[:, :, [2, 1, 0, 3]])
    return np.asarray(image, dtype=np.uint8)


def generate(seed: int, options: GeneratorOptions | None = None) -> Sample:
    """Renders the sample of ``seed``; the same seed always gives the same bytes and truth."""
    return _Renderer(seed, options or GeneratorOptions()).render()


def generate_with(seed: int, overrides: Overrides, options: GeneratorOptions | None = None) -> Sample:
    """Renders ``seed`` with some draws fixed; for hand-picked case sets."""
    return _Renderer(seed, options or GeneratorOptions(), overrides).render()


class _Renderer:
    """One sample's random draws and drawing; all randomness comes from one seeded generator."""

    def __init__(self, seed: int, options: GeneratorOptions, overrides: Overrides | None = None) -> None:
        self.seed = seed
        self.options = options
        self.fixed = overrides or Overrides()
        self.rng = np.random.default_rng(seed)
        self.cls = self.fixed.cls or CLASS_PATTERN[seed % len(CLASS_PATTERN)]

    def u(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    # --- scene -------------------------------------------------------------------------------------------

    def render(self) -> Sample:
        width, height = self._image_size()
        canvas = self._background(width, height)
        kind: SceneKind = "none"
        t_truth = c_truth = LineTruth(False, 0.0, 0.0, 0.0, 0.0)
        window: Window | None = None
        angle = 0.0
        colour: Literal["red", "blue", "none"] = "none"
        verdict = Verdict.INVALID
        if self.cls != "none":
            kind = "cassette" if self.rng.random() < 0.6 else "strip"
            kind = self.fixed.kind or kind
            c_contrast, t_contrast = self._line_strengths()
            if self.fixed.c_contrast is not None:
                c_contrast = self.fixed.c_contrast
            if self.fixed.t_contrast is not None:
                t_contrast = self.fixed.t_contrast
            colour = "red" if self.rng.random() < 0.65 else "blue"
            colour = self.fixed.colour or colour
            canvas, t_truth, c_truth, window, angle = self._place_object(
                canvas, kind, t_contrast, c_contrast, colour
            )
            if c_truth.present:
                verdict = Verdict.POSITIVE if t_truth.present else Verdict.NEGATIVE
        canvas = self._photo_effects(canvas, window)
        blur = self._blur_sigma(width)
        if blur > 0.3:
            canvas = cv2.GaussianBlur(canvas, (0, 0), blur)
        canvas = self._noise(canvas)
        mode, fmt, quality, encoded, image = self._encode(canvas)
        t_to_c = t_truth.contrast / c_truth.contrast if (t_truth.present and c_truth.present) else 0.0
        truth = Truth(
            seed=self.seed,
            verdict=verdict,
            kind=kind,
            test_line=t_truth,
            control_line=c_truth,
            t_to_c=t_to_c,
            window=window,
            width=width,
            height=height,
            colour_mode=mode,
            image_format=fmt,
            jpeg_quality=quality,
            blur_sigma_px=blur,
            angle_degrees=angle,
            line_colour=colour,
        )
        return Sample(encoded=encoded, image=image, truth=truth)

    def _image_size(self) -> tuple[int, int]:
        if self.options.size is not None:
            return self.options.size
        if self.rng.random() < self.options.large_fraction:
            width = int(self.rng.choice([1920, 2592, 3264, 4000]))
        else:
            width = int(self.rng.integers(320, 1281))
        aspect = float(self.rng.choice([0.75, 0.5625, 0.75, 0.667, 1.0]))
        height = max(240, round(width * aspect))
        if self.rng.random() < 0.15:  # portrait orientation
            width, height = height, width
            width = max(width, 320)
        return width, height

    def _line_strengths(self) -> tuple[float, float]:
        """Returns (C contrast, T contrast); 0 means the line is absent."""
        o = self.options
        c = self.u(0.06, 0.2) if self.rng.random() < o.weak_c_fraction else self.u(0.2, 0.85)
        t = 0.0
        if self.cls == "positive":
            if self.rng.random() < o.faint_t_fraction:
                t = self.u(o.min_t_contrast, 0.04)
            else:
                t = float(math.exp(self.u(math.log(0.04), math.log(0.85))))
        elif self.cls == "invalid":
            c = 0.0
            if self.rng.random() < 0.5:
                t = float(math.exp(self.u(math.log(0.05), math.log(0.8))))
        return c, t

    # --- background --------------------------------------------------------------------------------------

    def _background(self, width: int, height: int) -> FloatImage:
        rng = self.rng
        hue = self.u(0, 180)
        sat = self.u(0.0, 0.85) if rng.random() < 0.7 else self.u(0.0, 0.15)
        val = self.u(0.06, 0.55)
        base = _hsv_to_rgb(hue, sat, val)
        canvas = np.empty((height, width, 3), np.float32)
        canvas[:] = base
        style = int(rng.integers(0, 4))
        small_w, small_h = max(4, width // 16), max(4, height // 16)
        if style == 0:  # smooth blotches
            field: npt.NDArray[Any] = rng.normal(0, 1, (small_h // 4 + 2, small_w // 4 + 2)).astype(
                np.float32
            )
            field = cv2.resize(field, (width, height), interpolation=cv2.INTER_CUBIC)
            canvas *= (1 + 0.12 * field)[:, :, None]
        elif style == 1:  # wood-like stripes
            yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
            theta = self.u(0, math.pi)
            period = self.u(0.02, 0.1) * width
            phase = (xx * math.cos(theta) + yy * math.sin(theta)) / period
            wobble = np.sin(phase * 2 * math.pi + 2 * np.sin(yy / (period * 3)))
            canvas *= (1 + 0.1 * wobble)[:, :, None]
        elif style == 2:  # fabric: fine noise
            grain: npt.NDArray[Any] = rng.normal(0, 0.05, (height // 2 + 1, width // 2 + 1)).astype(
                np.float32
            )
            grain = cv2.resize(grain, (width, height), interpolation=cv2.INTER_LINEAR)
            canvas *= (1 + grain)[:, :, None]
        # style 3: plain
        for _ in range(int(rng.integers(0, 6)) if self.cls != "none" else int(rng.integers(0, 9))):
            self._random_object(canvas)
        return np.clip(canvas, 0, 1)

    def _random_object(self, canvas: FloatImage) -> None:
        rng = self.rng
        height, width = canvas.shape[:2]
        # Clutter around a test is darker than the white plastic; pictures without a test may hold light
        # objects too (paper, a cup), which the reader must not take for a strip.
        colour = _hsv_to_rgb(self.u(0, 180), self.u(0.2, 1.0), self.u(0.1, 0.55))
        if self.cls == "none" and rng.random() < 0.3:
            colour = (np.ones(3, np.float32) * self.u(0.6, 0.9)).astype(np.float32)
        cx, cy = self.u(0, width), self.u(0, height)
        size = self.u(0.05, 0.3) * width
        shape = int(rng.integers(0, 3))
        mask = np.zeros((height, width), np.float32)
        if shape == 0:
            axes = (int(size / 2), int(size * self.u(0.3, 1.0) / 2))
            cv2.ellipse(mask, (int(cx), int(cy)), axes, self.u(0, 180), 0, 360, 1.0, -1, cv2.LINE_AA)
        elif shape == 1:
            box = cv2.boxPoints(((cx, cy), (size, size * self.u(0.2, 1.0)), self.u(0, 180)))
            cv2.fillConvexPoly(mask, box.astype(np.int32), 1.0, cv2.LINE_AA)
        else:
            points = np.array(
                [[self.u(0, width), self.u(0, height)] for _ in range(4)], dtype=np.int32
            ).reshape(-1, 1, 2)
            thickness = max(1, int(size * 0.05))
            cv2.polylines(mask, [points], False, 1.0, thickness, cv2.LINE_AA)
        canvas *= (1 - mask)[:, :, None]
        canvas += mask[:, :, None] * colour

    # --- the test itself ---------------------------------------------------------------------------------

    def _membrane_colour(self) -> npt.NDArray[np.float32]:
        r = self.u(0.9, 0.98)
        return np.array([r, r * self.u(0.96, 1.0), r * self.u(0.86, 0.97)], np.float32)

    def _place_object(
        self,
        canvas: FloatImage,
        kind: SceneKind,
        t_contrast: float,
        c_contrast: float,
        colour: str,
    ) -> tuple[FloatImage, LineTruth, LineTruth, Window, float]:
        height, width = canvas.shape[:2]
        length = self.u(0.3, 0.95) * width
        # Keep the object inside the frame after rotation; a portrait image limits by height too.
        aspect = self.u(0.26, 0.34) if kind == "cassette" else self.u(0.06, 0.11)
        angle = self.u(-15, 15)
        angle = angle if self.fixed.angle is None else self.fixed.angle
        rad = math.radians(angle)
        bound_w = length * abs(math.cos(rad)) + length * aspect * abs(math.sin(rad))
        bound_h = length * abs(math.sin(rad)) + length * aspect * abs(math.cos(rad))
        shrink = min(1.0, 0.96 * width / bound_w, 0.9 * height / bound_h)
        length *= shrink
        sprite_len = round(length)
        sprite_h = max(8, round(length * aspect))
        if kind == "cassette":
            sprite, alpha, win_box, win_len = self._cassette(sprite_len, sprite_h)
        else:
            sprite, alpha, win_box, win_len = self._bare_strip(sprite_len, sprite_h)
        wx0, wy0, wx1, wy1 = win_box
        # Lines: the pair's middle near the window's middle, C on the right.
        spacing = self.u(0.2, 0.35)
        middle = self.u(0.45, 0.55)
        c_pos, t_pos = middle + spacing / 2, middle - spacing / 2
        line_w = self.u(0.01, 0.04)
        ranges = RED_PURPLE if colour == "red" else BLUE
        absorb = np.array([self.u(*band) for band in ranges], np.float32)
        for contrast, pos in ((c_contrast, c_pos), (t_contrast, t_pos)):
            if contrast > 0:
                self._draw_line(sprite, win_box, pos, line_w * win_len, contrast, absorb)
        # Homography: sprite -> image (rotation, scale 1, slight perspective, translation).
        cx = self.u(bound_w * shrink / 2 + 2, width - bound_w * shrink / 2 - 2)
        cy = self.u(bound_h * shrink / 2 + 2, height - bound_h * shrink / 2 - 2)
        homography = self._homography(sprite_len, sprite_h, angle, cx, cy)
        # Drop shadow, then the object.
        shadow = cv2.warpPerspective(alpha, homography, (width, height), flags=cv2.INTER_LINEAR)
        offset = _f32([[1, 0, self.u(-0.01, 0.02) * length], [0, 1, self.u(0, 0.03) * length]])
        shadow = cv2.warpAffine(shadow, offset, (width, height))
        shadow = cv2.GaussianBlur(shadow, (0, 0), max(1.0, 0.015 * length))
        canvas = canvas * (1 - self.u(0.2, 0.5) * shadow)[:, :, None]
        warped = cv2.warpPerspective(sprite, homography, (width, height), flags=cv2.INTER_LINEAR)
        walpha = cv2.warpPerspective(alpha, homography, (width, height), flags=cv2.INTER_LINEAR)
        canvas = canvas * (1 - walpha)[:, :, None] + warped * walpha[:, :, None]

        def to_image(x: float, y: float) -> tuple[float, float]:
            p = homography @ np.array([x, y, 1.0])
            return float(p[0] / p[2]), float(p[1] / p[2])

        wy = (wy0 + wy1) / 2
        lines = []
        for contrast, pos in ((t_contrast, t_pos), (c_contrast, c_pos)):
            px, py = to_image(wx0 + pos * (wx1 - wx0), wy)
            lines.append(LineTruth(contrast > 0, contrast, pos, px, py))
        wcx, wcy = to_image((wx0 + wx1) / 2, wy)
        window = Window(wcx, wcy, float(wx1 - wx0), float(wy1 - wy0), angle)
        return canvas.astype(np.float32), lines[0], lines[1], window, angle

    def _homography(
        self, sprite_len: int, sprite_h: int, angle: float, cx: float, cy: float
    ) -> npt.NDArray[Any]:
        src = _f32([[0, 0], [sprite_len, 0], [sprite_len, sprite_h], [0, sprite_h]])
        # Slight perspective: move the corners by up to ~3 % of the length (a few degrees of tilt).
        jitter = self.rng.uniform(-0.015, 0.015, (4, 2)).astype(np.float32) * sprite_len
        centred = src - _f32([sprite_len / 2, sprite_h / 2]) + jitter
        rad = math.radians(angle)
        # Image y points down; a positive angle turns the strip counter-clockwise on screen.
        rot = _f32([[math.cos(rad), math.sin(rad)], [-math.sin(rad), math.cos(rad)]])
        dst = centred @ rot.T + _f32([cx, cy])
        return cv2.getPerspectiveTransform(src, dst.astype(np.float32))

    def _cassette(
        self, length: int, height: int
    ) -> tuple[FloatImage, FloatImage, tuple[int, int, int, int], float]:
        body_v = self.u(0.8, 0.97)
        body = np.array([body_v * self.u(0.98, 1.02) for _ in range(3)], np.float32)
        sprite = np.empty((height, length, 3), np.float32)
        sprite[:] = body
        # Moulded body: slight top-to-bottom shading.
        shade = np.linspace(1.02, 0.95, height, dtype=np.float32)[:, None, None]
        sprite *= shade
        alpha = np.zeros((height, length), np.float32)
        radius = max(2, int(0.12 * height))
        _rounded_rect(alpha, 0, 0, length - 1, height - 1, radius)
        rim = alpha - cv2.erode(alpha, np.ones((3, 3), np.uint8))
        sprite *= (1 - 0.25 * rim)[:, :, None]
        win_len = self.u(0.3, 0.4) * length
        win_h = self.u(0.3, 0.42) * height
        win_cx = self.u(0.56, 0.64) * length
        x0, x1 = round(win_cx - win_len / 2), round(win_cx + win_len / 2)
        y0, y1 = round(height / 2 - win_h / 2), round(height / 2 + win_h / 2)
        self._fill_membrane(sprite, x0, y0, x1, y1)
        bevel = max(1.5, self.u(0.05, 0.09) * win_h)
        self._bevel(sprite, x0, y0, x1, y1, bevel, self.u(0.45, 0.75))
        # Sample well: a round opening on the left showing the sample pad.
        well_c = (int(0.2 * length), height // 2)
        well_r = int(self.u(0.22, 0.3) * height)
        pad = self._membrane_colour() * _f32([1.0, 0.93, 0.9]) * self.u(0.85, 0.95)
        cv2.circle(sprite, well_c, well_r, tuple(float(v) for v in pad), -1, cv2.LINE_AA)
        cv2.circle(
            sprite, well_c, well_r, tuple(float(v) * 0.55 for v in body), max(1, int(bevel)), cv2.LINE_AA
        )
        if self.rng.random() < 0.5:  # printed C and T marks above the window
            scale = max(0.3, (y0 - bevel) / 40)
            ink = np.zeros((height, length), np.uint8)
            for text, pos in (("C", 0.7), ("T", 0.3)):
                org = (int(x0 + pos * (x1 - x0)), int(y0 - bevel * 1.5 - 2))
                cv2.putText(
                    ink, text, org, cv2.FONT_HERSHEY_SIMPLEX, scale, 255, max(1, int(scale * 2)), cv2.LINE_AA
                )
            sprite *= (1 - 0.8 * ink.astype(np.float32) / 255)[:, :, None]
        return sprite, alpha, (x0, y0, x1, y1), float(x1 - x0)

    def _bare_strip(
        self, length: int, height: int
    ) -> tuple[FloatImage, FloatImage, tuple[int, int, int, int], float]:
        sprite = np.empty((height, length, 3), np.float32)
        alpha = np.ones((height, length), np.float32)
        a = int(self.u(0.2, 0.28) * length)
        b = int(a + self.u(0.42, 0.5) * length)
        membrane = self._membrane_colour()
        pad = membrane * _f32([1.0, 0.96, 0.88]) * self.u(0.8, 0.9)
        wick = membrane * self.u(0.84, 0.93)
        sprite[:, :a] = pad
        sprite[:, b:] = wick
        self._fill_membrane(sprite, a, 0, b, height, base=membrane)
        # Fibrous pads: streaks along the flow axis.
        fibres: npt.NDArray[Any] = self.rng.normal(0, 0.025, (height, max(2, length // 6))).astype(np.float32)
        fibres = cv2.resize(fibres, (length, height), interpolation=cv2.INTER_LINEAR)
        sprite[:, :a] *= (1 + fibres[:, :a])[:, :, None]
        sprite[:, b:] *= (1 + fibres[:, b:])[:, :, None]
        return sprite, alpha, (a, 0, b, height), float(b - a)

    def _fill_membrane(
        self,
        sprite: FloatImage,
        x0: int,
        y0: int,
        x1: int,
        y1: int,
        base: npt.NDArray[np.float32] | None = None,
    ) -> None:
        colour = self._membrane_colour() if base is None else base
        h, w = y1 - y0, x1 - x0
        region = np.empty((h, w, 3), np.float32)
        region[:] = colour
        # Residue of the sample's flow: a faint pink wash fading from the left.
        wash = self.u(0.0, 0.03) * np.linspace(1, 0, w, dtype=np.float32) ** 2
        region[:, :, 1] *= 1 - wash[None, :]
        region[:, :, 2] *= 1 - 0.6 * wash[None, :]
        grain = self.rng.normal(0, 0.004, (h, w)).astype(np.float32)
        region *= (1 + grain)[:, :, None]
        sprite[y0:y1, x0:x1] = region

    def _bevel(
        self, sprite: FloatImage, x0: int, y0: int, x1: int, y1: int, width: float, darkness: float
    ) -> None:
        """The window's recessed edge: a dark inner rim, darker on the top (light comes from above)."""
        h, w = y1 - y0, x1 - x0
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        dist = np.minimum.reduce([xx + 0.5, w - xx - 0.5, yy + 0.5, h - yy - 0.5])
        rim = np.clip(1 - dist / width, 0, 1)
        top = np.clip(1 - (yy + 0.5) / (width * 1.8), 0, 1)
        factor = 1 - (1 - darkness) * np.maximum(rim, top)
        sprite[y0:y1, x0:x1] *= factor[:, :, None]
        outer = max(1, round(width / 2))
        cv2.rectangle(
            sprite, (x0 - outer, y0 - outer), (x1 + outer - 1, y1 + outer - 1), (0.55, 0.55, 0.57), outer
        )

    def _draw_line(
        self,
        sprite: FloatImage,
        win_box: tuple[int, int, int, int],
        pos: float,
        line_width: float,
        contrast: float,
        absorb: npt.NDArray[np.float32],
    ) -> None:
        x0, y0, x1, y1 = win_box
        centre = x0 + pos * (x1 - x0)
        xs = np.arange(x0, x1, dtype=np.float32) + 0.5
        soft = 0.2 * line_width + 0.4
        shape = 0.5 * (
            _erf((xs - centre + line_width / 2) / soft) - _erf((xs - centre - line_width / 2) / soft)
        )
        h = y1 - y0
        # Lines are not perfectly even across the membrane.
        along = 1 + 0.08 * cv2.resize(
            self.rng.normal(0, 1, (max(2, h // 8), 1)).astype(np.float32),
            (1, h),
            interpolation=cv2.INTER_CUBIC,
        )
        depth = contrast * np.clip(along, 0.7, 1.3) * shape[None, :]
        transmit = 1 - depth[:, :, None] * absorb[None, None, :]
        sprite[y0:y1, x0:x1] *= np.clip(transmit, 0, 1)

    # --- the photo ---------------------------------------------------------------------------------------

    def _photo_effects(self, canvas: FloatImage, window: Window | None) -> FloatImage:
        rng = self.rng
        height, width = canvas.shape[:2]
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        light = np.ones((height, width), np.float32)
        strength = self.u(0.0, 0.4)
        if rng.random() < 0.5:  # linear gradient
            theta = self.u(0, 2 * math.pi)
            ramp = (xx - width / 2) * math.cos(theta) + (yy - height / 2) * math.sin(theta)
            ramp /= max(1.0, float(np.abs(ramp).max()))
            light *= 1 - strength * (ramp + 1) / 2
        else:  # vignette
            r2 = ((xx - width / 2) / (width / 2)) ** 2 + ((yy - height / 2) / (height / 2)) ** 2
            light *= 1 - strength * np.clip(r2 / 2, 0, 1)
        shadow_draw = rng.random() < 0.3
        if self.fixed.shadow is not None:
            shadow_draw = self.fixed.shadow > 0
        if shadow_draw:  # a soft-edged shadow across the scene, often across the window
            theta = self.u(0, 2 * math.pi)
            if window is not None and (rng.random() < 0.7 or self.fixed.shadow is not None):
                px = window.center_x + self.u(-0.5, 0.5) * window.length
                py = window.center_y + self.u(-0.5, 0.5) * window.width
            else:
                px, py = self.u(0, width), self.u(0, height)
            side = (xx - px) * math.cos(theta) + (yy - py) * math.sin(theta)
            soft = max(2.0, self.u(0.02, 0.08) * width)
            depth = self.u(0.15, 0.4) if self.fixed.shadow is None else self.fixed.shadow
            light *= 1 - depth * (0.5 + 0.5 * np.tanh(side / soft))
        cast = _f32([self.u(0.85, 1.1), self.u(0.9, 1.05), self.u(0.82, 1.12)])
        gain = self.u(0.75, 1.08)
        out = canvas * light[:, :, None] * (cast * gain)[None, None, :]
        return np.clip(out, 0, 1).astype(np.float32)

    def _blur_sigma(self, width: int) -> float:
        if self.fixed.blur_at_1000 is not None:
            return self.fixed.blur_at_1000 * max(width, 320) / 1000.0
        if self.rng.random() < 0.35:
            return 0.0
        return self.u(0.3, 2.5) * max(width, 320) / 1000.0

    def _noise(self, canvas: FloatImage) -> FloatImage:
        sigma = self.u(0.002, 0.02)
        height, width = canvas.shape[:2]
        noise = self.rng.standard_normal((height, width, 3), dtype=np.float32)
        # Shot noise grows with brightness.
        out = canvas + noise * (sigma * np.sqrt(np.clip(canvas, 0.02, 1)))
        clipped: FloatImage = np.clip(out, 0, 1).astype(np.float32)
        return clipped

    def _encode(
        self, canvas: FloatImage
    ) -> tuple[Literal["rgb", "rgba", "grey"], Literal["png", "jpeg"], int, bytes, npt.NDArray[np.uint8]]:
        pixels = np.clip(canvas * 255 + 0.5, 0, 255).astype(np.uint8)
        mode_draw = self.rng.random()
        mode: Literal["rgb", "rgba", "grey"] = (
            "rgb" if mode_draw < 0.75 else ("rgba" if mode_draw < 0.87 else "grey")
        )
        fmt: Literal["png", "jpeg"] = "jpeg" if self.rng.random() < 0.65 else "png"
        quality = int(self.rng.integers(40, 96)) if fmt == "jpeg" else 0
        mode = self.fixed.colour_mode or mode
        fmt = self.fixed.image_format or fmt
        if fmt == "jpeg":
            quality = self.fixed.jpeg_quality or quality or 75
        if fmt == "jpeg" and mode == "rgba":
            mode = "rgb"
        bgr = pixels[:, :, ::-1]
        if mode == "grey":
            data = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2GRAY)
        elif mode == "rgba":
            data = cv2.cvtColor(np.ascontiguousarray(bgr), cv2.COLOR_BGR2BGRA)
        else:
            data = np.ascontiguousarray(bgr)
        if fmt == "jpeg":
            ok, buf = cv2.imencode(".jpg", data, [cv2.IMWRITE_JPEG_QUALITY, quality])
        else:
            ok, buf = cv2.imencode(".png", data, [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError("encoding failed")
        encoded = buf.tobytes()
        return mode, fmt, quality, encoded, decode(encoded)


def _hsv_to_rgb(hue: float, sat: float, val: float) -> npt.NDArray[Any]:
    pixel = np.array([[[int(hue) % 180, int(sat * 255), int(val * 255)]]], dtype=np.uint8)
    rgb: npt.NDArray[Any] = cv2.cvtColor(pixel, cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32) / 255.0
    return rgb


def _rounded_rect(mask: FloatImage, x0: int, y0: int, x1: int, y1: int, radius: int) -> None:
    cv2.rectangle(mask, (x0 + radius, y0), (x1 - radius, y1), 1.0, -1)
    cv2.rectangle(mask, (x0, y0 + radius), (x1, y1 - radius), 1.0, -1)
    for cx, cy in (
        (x0 + radius, y0 + radius),
        (x1 - radius, y0 + radius),
        (x0 + radius, y1 - radius),
        (x1 - radius, y1 - radius),
    ):
        cv2.circle(mask, (cx, cy), radius, 1.0, -1, cv2.LINE_AA)


def _erf(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    # Abramowitz-Stegun 7.1.26; enough for a soft line edge and free of a scipy import here.
    sign = np.sign(x)
    ax = np.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * ax)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    result: npt.NDArray[Any] = (sign * (1 - poly * np.exp(-ax * ax))).astype(np.float32)
    return result


def _f32(values: Any) -> npt.NDArray[Any]:
    return np.array(values, dtype=np.float32)
