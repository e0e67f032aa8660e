"""The thumbnail made at upload: longest side at most N pixels, PNG when the image has alpha, else JPEG.

The decoded upload is the one large object an upload holds (up to 4 bytes a pixel: 200 MB for 50 megapixels);
the thumbnail adds no second full-size copy. The image is taken one strip of stored rows at a time, each strip
brought to 8 bits, premultiplied and reduced by an integer factor on its own; only the reduced image is
resampled, turned upright and encoded. Turning the small result, not the strips, keeps a phone's portrait
photo (stored sideways) as quick as any other: cutting columns and turning them doubled its time.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mesh.kit.orientation import SIDEWAYS, orient
from mesh.services.file.validation import DecodedImage

JPEG_QUALITY = 85
# The final Lanczos step shrinks at least this much after the integer reduction, which is then
# indistinguishable from one fair resampling (Pillow's ``reducing_gap``).
REDUCING_GAP = 3.0
# Source pixels brought to 8 bits at a time: a few MB of temporaries, whatever the image's size.
_STRIP_PIXELS = 1 << 20
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}
_PREMULTIPLIED = {"LA": "La", "RGBA": "RGBa"}
_UNPREMULTIPLIED = {"La": "LA", "RGBa": "RGBA"}
# ICC colour spaces (header bytes 16-20) that describe a thumbnail of each mode.
_ICC_SPACES = {"L": b"GRAY", "LA": b"GRAY", "RGB": b"RGB ", "RGBA": b"RGB "}


@dataclass(frozen=True)
class Thumbnail:
    """An encoded thumbnail."""

    data: bytes
    content_type: str
    width: int
    height: int


def make_thumbnail(decoded: DecodedImage, size: int = 256) -> Thumbnail:
    """Encode a thumbnail of an accepted image no larger than ``size`` on its longest side (never upscaled).

    16-bit images are scaled to 8 bits (not clipped), colour keys and palette transparency become alpha,
    the ICC profile is kept, and the EXIF orientation the reported width and height follow is applied
    (:mod:`mesh.kit.orientation`), so that the thumbnail shows what a viewer shows. The decoded image is
    left untouched.
    """
    image, orientation = decoded.image, decoded.orientation
    stored = (image.width, image.height)
    shown_target = _fit(*(stored[::-1] if orientation in SIDEWAYS else stored), size)
    target = shown_target[::-1] if orientation in SIDEWAYS else shown_target
    convert = _eight_bit_converter(image)

    def rows(top: int, bottom: int) -> Image.Image:
        """Stored rows ``top`` to ``bottom`` in 8 bits."""
        return convert(image.crop((0, top, image.width, bottom)))

    picture = rows(0, image.height) if target == stored else _shrink(rows, stored, target)
    if orientation != 1:
        picture = Image.fromarray(orient(np.asarray(picture), orientation))
    icc_profile = image.info.get("icc_profile")
    if not isinstance(icc_profile, bytes) or icc_profile[16:20] != _ICC_SPACES[picture.mode]:
        icc_profile = None  # a CMYK profile does not describe the RGB thumbnail of a CMYK JPEG
    buffer = io.BytesIO()
    if picture.mode in _ALPHA_MODES:
        picture.save(buffer, format="PNG", optimize=False, icc_profile=icc_profile)
        content_type = "image/png"
    else:
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY, icc_profile=icc_profile)
        content_type = "image/jpeg"
    return Thumbnail(buffer.getvalue(), content_type, picture.width, picture.height)


def _fit(width: int, height: int, size: int) -> tuple[int, int]:
    """The size within ``size`` x ``size`` that keeps the aspect ratio, rounded as ``Image.thumbnail`` does."""
    if size >= width and size >= height:
        return width, height
    aspect = width / height
    if aspect <= 1:
        return _round_aspect(size * aspect, lambda n: abs(aspect - n / size)), size
    return size, _round_aspect(size / aspect, lambda n: 0 if n == 0 else abs(aspect - size / n))


def _round_aspect(value: float, error: Callable[[int], float]) -> int:
    return max(min(math.floor(value), math.ceil(value), key=error), 1)


def _shrink(
    rows: Callable[[int, int], Image.Image], size: tuple[int, int], target: tuple[int, int]
) -> Image.Image:
    """The image of ``size`` whose ``rows(top, bottom)`` are given, resized to ``target``.

    Equal to ``resize(target, LANCZOS, reducing_gap=REDUCING_GAP)`` of the whole image: strips are whole
    multiples of the reduction factor, so the reduced pixels are the same. Like ``resize``, alpha is
    premultiplied meanwhile so that the colour of transparent pixels does not bleed into their neighbours.
    """
    width, height = size
    factor_x = int(width / target[0] / REDUCING_GAP) or 1
    factor_y = int(height / target[1] / REDUCING_GAP) or 1
    step = max(1, _STRIP_PIXELS // (width * factor_y)) * factor_y
    reduced: Image.Image | None = None
    for top in range(0, height, step):
        strip = rows(top, min(top + step, height))
        strip = strip.convert(_PREMULTIPLIED.get(strip.mode, strip.mode)).reduce((factor_x, factor_y))
        if reduced is None:
            reduced = Image.new(strip.mode, (math.ceil(width / factor_x), math.ceil(height / factor_y)))
        reduced.paste(strip, (0, top // factor_y))
    assert reduced is not None  # an accepted image has at least one row
    resized = reduced.resize(
        target, Image.Resampling.LANCZOS, box=(0, 0, width / factor_x, height / factor_y)
    )
    return resized.convert(_UNPREMULTIPLIED.get(resized.mode, resized.mode))


def _eight_bit_converter(image: Image.Image) -> Callable[[Image.Image], Image.Image]:
    """What turns (a strip of) ``image`` into 8-bit L, LA, RGB or RGBA."""
    key = image.info.get("transparency")
    if image.mode.startswith("I;16") or image.mode == "I":
        grey_key = key if isinstance(key, int) else None
        return lambda strip: _grey_8bit(strip, grey_key)
    mode = _eight_bit_mode(image.mode, has_colour_key=key is not None)
    return lambda strip: strip.convert(mode)


def _eight_bit_mode(mode: str, *, has_colour_key: bool) -> str:
    if mode == "P":
        return "RGBA" if has_colour_key else "RGB"
    if mode in ("L", "RGB") and has_colour_key:  # a tRNS colour key is alpha too
        return "LA" if mode == "L" else "RGBA"
    if mode in _ALPHA_MODES:
        return "LA" if mode in ("LA", "La") else "RGBA"
    return "L" if mode in ("1", "L") else "RGB"


def _grey_8bit(strip: Image.Image, key: int | None) -> Image.Image:
    """A 16- or 32-bit grey strip as 8-bit L by scaling the top of its range (LA when ``key`` is transparent)."""
    pixels = np.asarray(strip)
    grey = (pixels >> 8).clip(0, 255).astype(np.uint8)
    if key is None:
        return Image.fromarray(grey)
    alpha = np.where(pixels == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([grey, alpha]))
