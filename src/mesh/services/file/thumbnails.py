"""The thumbnail made at upload: longest side at most N pixels, PNG when the image has alpha, else JPEG."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

JPEG_QUALITY = 85
_ALPHA_MODES = {"RGBA", "LA", "PA", "La", "RGBa"}


@dataclass(frozen=True)
class Thumbnail:
    """An encoded thumbnail."""

    data: bytes
    content_type: str
    width: int
    height: int


def make_thumbnail(image: Image.Image, size: int = 256) -> Thumbnail:
    """Encode a copy of ``image`` no larger than ``size`` on its longest side (never upscaled).

    16-bit images are scaled to 8 bits (not clipped), palette images keep their transparency, and the
    EXIF orientation is applied so that the thumbnail shows what a viewer shows.
    """
    picture = _to_8bit(image)
    picture = ImageOps.exif_transpose(picture)
    has_alpha = picture.mode in _ALPHA_MODES
    if has_alpha:
        picture = picture.convert("LA" if picture.mode in ("LA", "La") else "RGBA")
    elif picture.mode not in ("L", "RGB"):
        picture = picture.convert("RGB")
    if picture is image:
        picture = picture.copy()  # thumbnail() works in place; the caller's image stays untouched
    picture.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    if has_alpha:
        picture.save(buffer, format="PNG", optimize=False)
        content_type = "image/png"
    else:
        picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        content_type = "image/jpeg"
    return Thumbnail(buffer.getvalue(), content_type, picture.width, picture.height)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Single-channel 16- or 32-bit integer images to 8-bit grey by scaling the top of their range."""
    if image.mode.startswith("I;16") or image.mode == "I":
        pixels = np.asarray(image).astype(np.uint32)
        return Image.fromarray((pixels >> 8).clip(0, 255).astype(np.uint8))
    if image.mode == "P":
        return image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("L", "RGB") and "transparency" in image.info:  # a tRNS colour key is alpha too
        return image.convert("LA" if image.mode == "L" else "RGBA")
    if image.mode == "1":
        return image.convert("L")
    return image
