"""Thumbnails made at upload."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mesh.services.file.thumbnails import make_thumbnail
from mesh.services.file.validation import validate_image
from tests.file import corpus


@pytest.mark.parametrize(
    ("data", "content_type", "mode"),
    [
        (corpus.png("RGBA", 600, 300), "image/png", "RGBA"),
        (corpus.png("LA", 600, 300), "image/png", "LA"),
        (corpus.webp("RGBA", 600, 300), "image/png", "RGBA"),
        (corpus.png("RGB", 600, 300), "image/jpeg", "RGB"),
        (corpus.jpeg("L", 600, 300), "image/jpeg", "L"),
        (corpus.png("P", 600, 300), "image/jpeg", "RGB"),
        (corpus.encode(corpus.pixels("RGB", 600, 300).convert("CMYK"), "JPEG"), "image/jpeg", "RGB"),
        (corpus.encode(corpus.pixels("L", 600, 300), "PNG", transparency=0), "image/png", "LA"),
    ],
)
def test_thumbnail_is_png_with_alpha_else_jpeg_and_fits_256(
    data: bytes, content_type: str, mode: str
) -> None:
    """The longest side becomes 256 px (aspect kept); alpha sources give PNG, others JPEG."""
    thumb = make_thumbnail(validate_image(data).image, 256)
    assert thumb.content_type == content_type
    decoded = Image.open(io.BytesIO(thumb.data))
    assert decoded.size == (thumb.width, thumb.height) == (256, 128)
    assert decoded.mode == mode


def test_small_images_are_not_upscaled() -> None:
    """An image already smaller than the thumbnail keeps its size."""
    thumb = make_thumbnail(validate_image(corpus.png("RGB", 40, 30)).image, 256)
    assert (thumb.width, thumb.height) == (40, 30)


def test_16bit_images_are_scaled_not_clipped() -> None:
    """A 16-bit grey gradient keeps its gradient in 8 bits instead of saturating to white."""
    gradient = Image.fromarray(
        (np.arange(512, dtype=np.uint32) * 128).astype(np.uint16).reshape(1, 512).repeat(8, 0)
    )
    data = corpus.encode(gradient, "PNG")
    image = validate_image(data).image
    assert image.mode.startswith("I")
    thumb = make_thumbnail(image, 256)
    pixels = np.asarray(Image.open(io.BytesIO(thumb.data)).convert("L"), dtype=np.int32)
    assert pixels[:, 0].mean() < 20
    assert pixels[:, -1].mean() > 230


def test_16bit_colour_png_gets_a_thumbnail() -> None:
    """A 16-bit RGB PNG gives a JPEG thumbnail of its size."""
    thumb = make_thumbnail(validate_image(corpus.png_16bit_rgb()).image, 256)
    assert thumb.content_type == "image/jpeg"
    assert (thumb.width, thumb.height) == (32, 16)


def test_source_image_is_left_untouched() -> None:
    """Making a thumbnail does not shrink the caller's decoded image."""
    image = validate_image(corpus.png("RGB", 600, 300)).image
    make_thumbnail(image, 64)
    assert image.size == (600, 300)
