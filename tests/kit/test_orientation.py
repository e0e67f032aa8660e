"""EXIF orientation applied to NumPy pixels exactly as Pillow's exif_transpose applies it to images."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from mesh.kit.orientation import ORIENTATION_TAG, displayed_size, exif_orientation, orient


def _png_with_orientation(pixels: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", exif=exif.tobytes())
    return buffer.getvalue()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_matches_pillows_exif_transpose(orientation: int) -> None:
    """Each of the eight orientations turns the pixels as Pillow does, and the size is reported turned too."""
    pixels = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    with Image.open(io.BytesIO(_png_with_orientation(pixels, orientation))) as opened:
        found = exif_orientation(opened)
        expected = np.asarray(ImageOps.exif_transpose(opened))
    assert found == orientation
    turned = orient(pixels, orientation)
    np.testing.assert_array_equal(turned, expected)
    assert turned.flags.c_contiguous
    assert displayed_size(7, 5, orientation) == (expected.shape[1], expected.shape[0])


def test_no_tag_or_a_bad_one_is_upright() -> None:
    """An image without EXIF, or with an orientation outside 1-8, is read as stored."""
    pixels = np.zeros((4, 6, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    with Image.open(buffer) as plain:
        assert exif_orientation(plain) == 1
    with Image.open(io.BytesIO(_png_with_orientation(pixels, 9))) as odd:
        assert exif_orientation(odd) == 1
    assert orient(pixels, 1) is pixels
