"""EXIF orientation applied to NumPy pixels exactly as Pillow's exif_transpose applies it to images."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageOps

from mesh.kit.orientation import (
    ORIENTATION_TAG,
    displayed_size,
    exif_orientation,
    orient,
    orient_image,
)


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
    np.testing.assert_array_equal(np.asarray(orient_image(Image.fromarray(pixels), orientation)), expected)
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


def png_with_exif_block(block: bytes, *, after_pixels: bool = False) -> bytes:
    """A 6x4 PNG whose eXIf chunk holds ``block``, before its pixel data or after it."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    chunk = struct.pack(">I", len(block)) + b"eXIf" + block
    chunk += struct.pack(">I", zlib.crc32(b"eXIf" + block))
    at = len(data) - 12 if after_pixels else 33  # before IEND, or right after IHDR
    return data[:at] + chunk + data[at:]


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(
    "block", [b"garbage-not-tiff", b"MM\x00*\x7f\xff\xff\xff", b"II*\x00\xff\xff\x00\x00"]
)
def test_a_damaged_exif_block_is_read_as_upright(block: bytes) -> None:
    """An EXIF block Pillow cannot parse (not TIFF, an IFD offset past its end) is read as no orientation:
    the pixels are whole (Pillow's SyntaxError escaped, and the file service answered INTERNAL)."""
    with Image.open(io.BytesIO(png_with_exif_block(block))) as opened:
        assert "exif" in opened.info
        assert exif_orientation(opened) == 1


def test_a_late_exif_chunk_is_not_read_before_the_pixels_load() -> None:
    """The orientation is what the header held: a PNG's eXIf chunk after its pixel data is not seen before
    loading, which is when every service reads it (so that all of them report one size)."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = 6
    with Image.open(io.BytesIO(png_with_exif_block(exif.tobytes(), after_pixels=True))) as opened:
        assert exif_orientation(opened) == 1
