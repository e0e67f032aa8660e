"""The lateral-flow strip reader: strip -> read window -> line profile -> C and T -> verdict.

1. Downscale by an integer factor to about ``work_size`` pixels and find the strip (``locate``).
2. Resample a rotated crop of the strip from the full image, flow axis horizontal (``backend``).
3. Find the read window in it and build the background-corrected profile (``profile``). An object that turns out
   to be neither a cassette nor a bare strip (too squat, no window) makes way for the next most strip-like one;
   such a runner-up, or an object in a corner of the picture, is the test only where it shows a control line.
4. C is the strongest line in the window's right half, short of its rim (flow runs left to right); T is the
   strongest response of a C-shaped, C-coloured matched filter at the expected spacing left of C, its
   signal-to-noise ratio discounted where its own colour differs from C's. A line counts when its contrast and
   its signal-to-noise ratio pass thresholds calibrated on the train split (T's has one value for a
   cassette's window and one for a bare strip, whose false lines run higher). Where no C passes but a line
   shows left of the middle (SNR 6 or more), it is the template the other way round: a weak C is searched at the
   lines' spacing right of it, against its own calibrated threshold. No strip, or no C, is INVALID: the
   reader never says POSITIVE or NEGATIVE without having found a strip.

The pre-check runs the same steps on a smaller crop and stops at the quality verdict; its answer carries
``precheck_only=True``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cv2
import numpy as np
import numpy.typing as npt

from mesh.services.inference.strip.backend import Backend, CpuBackend, CropGeometry, gpu_backend
from mesh.services.inference.strip.config import ReaderConfig
from mesh.services.inference.strip.locate import Placement, find_objects
from mesh.services.inference.strip.profile import (
    C_ZONE,
    T_ZONE,
    MatchedLine,
    Peak,
    Profile,
    WindowBox,
    find_window,
    matched_test_line,
    window_profile,
)
from mesh.services.inference.strip.types import (
    ABSENT_LINE,
    LineReading,
    QualityFlag,
    StripReading,
    Verdict,
    Window,
)

ByteImage = npt.NDArray[Any]  # OpenCV returns loosely typed arrays
FloatImage = npt.NDArray[Any]  # OpenCV returns loosely typed arrays

# Across the strip, the crop keeps this much of the strip's width as margin on each side.
ACROSS_MARGIN = 0.12

# The smallest side of an image the reader takes (a strip at 30 % of such a width is 5 pixels long).
MIN_IMAGE_SIDE = 16
# The smallest side of the working overview: a long sliver whose short side downscales to less holds no strip
# (and downscaling it to nothing crashed).
MIN_WORKING_SIDE = 3

# A bare strip is at most this wide for its length (train seeds 0-1999: bare strips 0.04-0.133 as found,
# cassettes 0.239 and up): an object squatter than that in which no cassette's window shows is neither, and is
# not read as a bare strip (a pale ellipse crossed by a dark stroke read NEGATIVE, its stroke taken for C).
MAX_BARE_STRIP_ASPECT = 0.2
# The objects tried, most strip-like first, until one is a cassette or a bare strip: a brown box larger than a
# bare strip beside it won (train seed 866), and was refused as too squat.
MAX_OBJECTS_TRIED = 3

# Where no C passes, a line left of the middle this many noise deviations above the profile is template enough
# to search for a weak C beside it.
TEMPLATE_LINE_SNR = 6.0


@dataclass(frozen=True)
class Scores:
    """Raw scores of the best C and T candidates, whether or not they passed."""

    found: bool
    c_height: float = 0.0
    c_snr: float = 0.0
    t_height: float = 0.0
    t_snr: float = 0.0
    framed: bool = False
    c_beside_test_snr: float = 0.0
    """Where no C passed but a T fit to be a template showed: the best C found with it (0 otherwise)."""


@dataclass(frozen=True)
class _Lines:
    control: Peak | None
    test: MatchedLine | None
    test_candidate: MatchedLine | None
    strongest_c_candidate: Peak | None
    matched_c_snr: float = 0.0
    """The best C found with T as the template, where that search ran (0 otherwise)."""

    c_threshold: float = 0.0
    """The signal-to-noise threshold that ``control`` passed."""


def to_uint8(image: npt.NDArray[np.generic]) -> ByteImage:
    """HxW, HxWx3 (RGB) or HxWx4 (RGBA) in uint8 or uint16 -> uint8 grey or RGB; RGBA is seen over black."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ValueError(f"expected HxW, HxWx3 or HxWx4 pixels, got shape {array.shape}")
    if array.shape[0] < MIN_IMAGE_SIDE or array.shape[1] < MIN_IMAGE_SIDE:
        raise ValueError(f"image too small: {array.shape[1]}x{array.shape[0]}")
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"expected uint8 or uint16 pixels, got {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 4:
        rgba = np.ascontiguousarray(array)
        # A transparent pixel's colour is whatever the encoder left there (often white, or the photo a cut-out
        # was cut from), so it is shown over black: a cut-out strip then stands on a dark ground, as on a table.
        if cv2.minMaxLoc(cv2.extractChannel(rgba, 3))[0] < 255:
            rgba = cv2.cvtColor(rgba, cv2.COLOR_RGBA2mRGBA)
        # One vectorised pass; copying NumPy's strided view ``array[:, :, :3]`` took 10-16 ms at 1080p.
        return np.asarray(cv2.cvtColor(rgba, cv2.COLOR_RGBA2RGB), dtype=np.uint8)
    return np.ascontiguousarray(array)


class StripReader:
    """Reads lateral-flow test photos; thread-safe (no state changes after construction)."""

    def __init__(self, config: ReaderConfig | None = None, device: Literal["cpu", "gpu"] = "cpu") -> None:
        self.config = config or ReaderConfig()
        self.device = device
        self.backend: Backend = gpu_backend() if device == "gpu" else CpuBackend()

    def read(self, image: npt.NDArray[Any]) -> StripReading:
        """The full reading of one image."""
        return self._run(to_uint8(image), self.config.crop_length, precheck=False)[0]

    def read_with_scores(self, image: npt.NDArray[Any]) -> tuple[StripReading, Scores]:
        """The reading plus the raw line scores behind it (for calibration and diagnosis)."""
        return self._run(to_uint8(image), self.config.crop_length, precheck=False)

    def precheck(self, image: npt.NDArray[Any]) -> StripReading:
        """The fast quality pre-check: strip found, blur, exposure, control line."""
        return self._run(to_uint8(image), self.config.precheck_crop_length, precheck=True)[0]

    def read_batch(self, images: Sequence[npt.NDArray[Any]]) -> list[StripReading]:
        """Readings of several images, in order."""
        return [self.read(image) for image in images]

    # --- pipeline ----------------------------------------------------------------------------------------

    def _run(self, image: ByteImage, crop_length: int, precheck: bool) -> tuple[StripReading, Scores]:
        cfg = self.config
        height, width = image.shape[:2]
        factor = max(1, math.ceil(max(height, width) / cfg.work_size))
        if min(height, width) // factor < MIN_WORKING_SIDE:  # a sliver (16x8193): nothing to find in it
            return _not_found(precheck), Scores(found=False)
        small = self.backend.downscale(image, factor)
        for rank, placement in enumerate(find_objects(small, cfg.min_object_area, MAX_OBJECTS_TRIED)):
            geometry = _crop_geometry(placement, factor, crop_length)
            crop = self.backend.rectify(image, geometry)
            margin = ACROSS_MARGIN * placement.width * factor * geometry.scale
            grey = crop if crop.ndim == 2 else cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
            box = find_window(grey, margin)
            if not box.framed and placement.width > MAX_BARE_STRIP_ASPECT * placement.length:
                continue  # neither a cassette nor a bare strip: the next object may be the test
            reading, scores = self.read_crop(crop, grey, box, margin, geometry, width, precheck)
            # An object that is not the most strip-like, or one in a corner of the picture, counts as the test
            # only where it shows a control line: otherwise, in pictures without a test, a lit corner or a stick
            # beside a squat box was read as a strip without C (10 of 800 train pictures without a test).
            if (rank > 0 or placement.at_corner) and not reading.control_line.present:
                continue
            return reading, scores
        return _not_found(precheck), Scores(found=False)

    def read_crop(
        self,
        crop: FloatImage,
        grey: FloatImage,
        box: WindowBox,
        margin: float,
        geometry: CropGeometry,
        image_width: int,
        precheck: bool,
    ) -> tuple[StripReading, Scores]:
        """Everything after the read window (in the rectified crop, float 0..1, and its ``grey``): profile,
        lines, flags, verdict."""
        profile = window_profile(crop, box, self.config.noise_floor)
        lines = self._lines(profile, box.framed)
        flags = self._quality(grey, margin, geometry, image_width, profile)
        c, t = lines.strongest_c_candidate, lines.test_candidate
        scores = Scores(
            found=True,
            c_height=0.0 if c is None else c.height,
            c_snr=0.0 if c is None else c.snr,
            t_height=0.0 if t is None else t.height,
            t_snr=0.0 if t is None else t.snr,
            framed=box.framed,
            c_beside_test_snr=lines.matched_c_snr,
        )
        return self._reading(lines, profile, box, geometry, flags, precheck), scores

    def _lines(self, profile: Profile, framed: bool) -> _Lines:
        cfg = self.config
        n = float(profile.signal.size)
        right = [p for p in profile.peaks if C_ZONE[0] <= p.index / n <= C_ZONE[1]]
        c_candidate = max(right, key=lambda p: p.height, default=None)
        control = None
        if (
            c_candidate is not None
            and c_candidate.height >= cfg.c_min_intensity
            and c_candidate.snr >= cfg.c_min_snr
        ):
            control = c_candidate
        c_threshold = cfg.c_min_snr
        t_candidate: MatchedLine | None
        matched_c: MatchedLine | None = None
        if control is not None:
            c_pos = control.index / n
            t_candidate = matched_test_line(
                profile, control, (c_pos - T_ZONE[1], c_pos - T_ZONE[0]), cfg.t_noise_floor
            )
        else:
            left = [p for p in profile.peaks if p.index / n < C_ZONE[0]]
            best = max(left, key=lambda p: p.snr, default=None)
            t_candidate = None if best is None else MatchedLine(best.index, best.height, best.snr)
            if best is not None and best.snr >= TEMPLATE_LINE_SNR:
                control, matched_c = self._control_beside(profile, best)
                if control is not None:
                    c_threshold = cfg.c_min_snr_beside_test
        test = None
        if (
            t_candidate is not None
            and t_candidate.height >= cfg.t_min_intensity
            and t_candidate.snr >= cfg.t_snr_threshold(framed)
        ):
            test = t_candidate
        return _Lines(
            control=control,
            test=test,
            test_candidate=t_candidate,
            strongest_c_candidate=c_candidate,
            matched_c_snr=0.0 if matched_c is None else matched_c.snr,
            c_threshold=c_threshold,
        )

    def _control_beside(self, profile: Profile, test: Peak) -> tuple[Peak | None, MatchedLine | None]:
        """A weak C searched with ``test`` as the template, at the lines' spacing right of it: (C where it
        passes, else None; the best candidate).

        T is as good a template for a weak C as C is for a faint T (same particles, same striping), and it says
        where C may lie. A line the matched filter finds must reach a matched line's contrast, not a plain
        peak's: a thin C of 6-11 % read 0.9-2 % in windows of 50-120 pixels, at SNR 4.4-9.
        """
        cfg = self.config
        n = float(profile.signal.size)
        t_pos = test.index / n
        found = matched_test_line(profile, test, (t_pos + T_ZONE[0], t_pos + T_ZONE[1]), cfg.t_noise_floor)
        if (
            found is None
            or found.height < cfg.t_min_intensity
            or found.snr < cfg.c_min_snr_beside_test
            or found.index / n > C_ZONE[1]
        ):
            return None, found
        # The filter matched it to T's colour and shape, so it has T's chroma.
        return Peak(found.index, found.height, found.snr, chroma=test.chroma), found

    def _quality(
        self, grey: FloatImage, margin: float, geometry: CropGeometry, image_width: int, profile: Profile
    ) -> list[QualityFlag]:
        cfg = self.config
        flags: list[QualityFlag] = []
        top, bottom = int(margin), max(int(margin) + 1, grey.shape[0] - int(margin))
        # Every other row and column: the exposure of a strip does not need every pixel (a full median is
        # a few milliseconds on a 1080p picture's crop).
        body = grey[top:bottom:2, ::2]
        level = float(np.median(body))
        if level < cfg.underexposed_level:
            flags.append(QualityFlag.UNDEREXPOSED)
        if float(np.mean(body >= 0.985)) > cfg.overexposed_fraction:
            flags.append(QualityFlag.OVEREXPOSED)
        if profile.level_ratio > cfg.uneven_ratio:
            flags.append(QualityFlag.UNEVEN_LIGHTING)
        sigma = _edge_blur(grey, margin)
        if sigma is not None:
            sigma_at_1000 = sigma / geometry.scale * 1000.0 / max(image_width, 1)
            if sigma_at_1000 > cfg.blur_flag_sigma:
                flags.append(QualityFlag.BLUR)
        return flags

    def _reading(
        self,
        lines: _Lines,
        profile: Profile,
        box: WindowBox,
        geometry: CropGeometry,
        flags: list[QualityFlag],
        precheck: bool,
    ) -> StripReading:
        cfg = self.config
        n = profile.signal.size
        y_mid = (box.y0 + box.y1) / 2

        def line(peak: Peak | MatchedLine | None) -> LineReading:
            if peak is None:
                return ABSENT_LINE
            u = box.x0 + peak.index
            x, y = geometry.to_image(u, y_mid)
            # Along the strip in image pixels, from the window's sample end.
            return LineReading(
                present=True,
                position_px=peak.index / geometry.scale,
                position=peak.index / max(n - 1, 1),
                intensity=min(1.0, max(0.0, peak.height)),
                center_x=x,
                center_y=y,
            )

        wx, wy = geometry.to_image((box.x0 + box.x1) / 2, y_mid)
        window = Window(
            center_x=wx,
            center_y=wy,
            length=(box.x1 - box.x0) / geometry.scale,
            width=(box.y1 - box.y0) / geometry.scale,
            angle_degrees=-math.degrees(geometry.angle_rad),
        )
        control = line(lines.control)
        if lines.control is None:
            flags.append(QualityFlag.NO_CONTROL_LINE)
            verdict = Verdict.INVALID
            c = lines.strongest_c_candidate
            # Sure it is invalid when no candidate comes near the control thresholds.
            closeness = 0.0 if c is None else max(c.snr / cfg.c_min_snr, c.height / cfg.c_min_intensity * 0.5)
            confidence = _clamp(1.0 - 0.5 * closeness**2)
            test = line(lines.test)
            ratio = 0.0
        else:
            test = line(lines.test)
            verdict = Verdict.POSITIVE if lines.test is not None else Verdict.NEGATIVE
            c_conf = _sigmoid((lines.control.snr - lines.c_threshold) / 2.0)
            t_snr = lines.test_candidate.snr if lines.test_candidate is not None else 0.0
            t_conf = _sigmoid(abs(t_snr - cfg.t_snr_threshold(box.framed)) / 1.0 + 0.5)
            confidence = _clamp(c_conf * t_conf)
            ratio = (
                test.intensity / control.intensity
                if lines.test is not None and control.intensity > 0
                else 0.0
            )
        return StripReading(
            verdict=verdict,
            control_line=control,
            test_line=test,
            t_to_c_ratio=float(ratio),
            confidence=float(confidence),
            quality_flags=tuple(dict.fromkeys(flags)),
            window=window,
            precheck_only=precheck,
        )


def _crop_geometry(placement: Placement, factor: int, crop_length: int) -> CropGeometry:
    # Working-image pixel centres map to the middle of each factor x factor block.
    cx = (placement.center_x + 0.5) * factor - 0.5
    cy = (placement.center_y + 0.5) * factor - 0.5
    length = placement.length * factor
    width = placement.width * factor
    scale = min(1.0, crop_length / max(length, 1.0))
    size_x = max(16, round(length * 0.98 * scale))
    size_y = max(8, round(width * (1 + 2 * ACROSS_MARGIN) * scale))
    return CropGeometry(cx, cy, placement.angle_rad, scale, size_x, size_y)


def _edge_blur(grey: FloatImage, margin: float) -> float | None:
    """Defocus sigma (crop pixels) estimated from the strip's long edges: step height over peak slope."""
    height, width = grey.shape
    band = grey[:, int(0.3 * width) : int(0.7 * width)]
    if band.size == 0 or margin < 3:
        return None
    across = band.mean(axis=1)
    slope = np.abs(np.gradient(across))
    estimates = []
    for edge in (int(margin), height - 1 - int(margin)):
        lo, hi = max(0, edge - int(margin)), min(height, edge + int(margin) + 1)
        if hi - lo < 4:
            continue
        window = across[lo:hi]
        step = float(window.max() - window.min())
        peak = float(slope[lo:hi].max())
        if step > 0.08 and peak > 1e-4:
            estimates.append(step / (peak * math.sqrt(2 * math.pi)))
    return min(estimates) if estimates else None


def _not_found(precheck: bool) -> StripReading:
    return StripReading(
        verdict=Verdict.INVALID,
        control_line=ABSENT_LINE,
        test_line=ABSENT_LINE,
        t_to_c_ratio=0.0,
        confidence=0.9,
        quality_flags=(QualityFlag.STRIP_NOT_FOUND,),
        window=None,
        precheck_only=precheck,
    )


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, x))))


def _clamp(x: float) -> float:
    return max(0.0, min(1.0, x))
