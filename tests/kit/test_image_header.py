"""mesh.kit.image_header: one reader of what an encoded image's header says, for every service that sizes an image
before decoding it."""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image

from mesh.kit.image_header import read_header
from mesh.kit.orientation import ORIENTATION_TAG


def _pillow(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _png16(channels: int) -> bytes:
    """A 16-bit PNG (Pillow writes none but grey), 7 wide and 5 high."""
    ok, encoded = cv2.imencode(".png", np.full((5, 7, channels), 40_000, np.uint16))
    assert ok
    return bytes(encoded.tobytes())


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return exif.tobytes()


def _png_declaring(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares ``width`` x ``height`` pixels (its CRC made right), with one pixel's data."""
    data = bytearray(_pillow(Image.new("RGB", (1, 1)), "PNG"))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    return bytes(data)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A JPEG whose frame header (SOF0) declares ``width`` x ``height`` pixels."""
    data = bytearray(_pillow(Image.new("RGB", (8, 8)), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_declaring(width: int, height: int) -> bytes:
    """An extended WebP (VP8X, as Pillow writes one with EXIF) whose canvas is ``width`` x ``height``."""
    data = bytearray(_pillow(Image.new("RGB", (8, 8)), "WEBP", exif=_exif(1)))
    assert data[12:16] == b"VP8X"
    data[24:30] = (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return bytes(data)


SAMPLES = {
    "png grey 8-bit": (_pillow(Image.new("L", (7, 5)), "PNG"), "PNG", "L", 1),
    "png grey 16-bit": (_png16(1), "PNG", "I;16", 2),
    "png RGB 8-bit": (_pillow(Image.new("RGB", (7, 5)), "PNG"), "PNG", "RGB", 1),
    "png RGB 16-bit": (_png16(3), "PNG", "RGB", 2),
    "png RGBA 8-bit": (_pillow(Image.new("RGBA", (7, 5)), "PNG"), "PNG", "RGBA", 1),
    "png RGBA 16-bit": (_png16(4), "PNG", "RGBA", 2),
    "png palette": (_pillow(Image.new("P", (7, 5)), "PNG"), "PNG", "P", 1),
    "jpeg grey": (_pillow(Image.new("L", (7, 5)), "JPEG"), "JPEG", "L", 1),
    "jpeg RGB": (_pillow(Image.new("RGB", (7, 5)), "JPEG"), "JPEG", "RGB", 1),
    "jpeg CMYK": (_pillow(Image.new("CMYK", (7, 5)), "JPEG"), "JPEG", "CMYK", 1),
    "webp RGB": (_pillow(Image.new("RGB", (7, 5)), "WEBP"), "WEBP", "RGB", 1),
    "webp RGBA lossless": (_pillow(Image.new("RGBA", (7, 5)), "WEBP", lossless=True), "WEBP", "RGBA", 1),
}


@pytest.mark.parametrize(("data", "fmt", "mode", "itemsize"), SAMPLES.values(), ids=SAMPLES.keys())
def test_the_header_tells_format_size_mode_and_sample_size(
    data: bytes, fmt: str, mode: str, itemsize: int
) -> None:
    """Each layout the services accept: Pillow's mode as it reads the header, and 2-byte samples for a 16-bit
    PNG (whose RGB(A) Pillow's mode reduces to 8 bits) from its IHDR."""
    header = read_header(data)
    assert header is not None
    assert (header.format, header.width, header.height, header.mode, header.itemsize) == (
        fmt,
        7,
        5,
        mode,
        itemsize,
    )
    assert header.orientation == 1


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_an_exif_turned_image_is_read_as_stored_and_shown_turned(fmt: str) -> None:
    """A phone's portrait photo stored sideways (orientation 6): width and height as stored, ``shown_size`` as a
    viewer (and each service's decoder) turns it."""
    header = read_header(_pillow(Image.new("RGB", (12, 7)), fmt, exif=_exif(6)))
    assert header is not None
    assert (header.width, header.height, header.orientation) == (12, 7, 6)
    assert header.shown_size == (7, 12)


@pytest.mark.parametrize("keep", [8, 16, 24, 30, 40])
def test_a_png_cut_off_within_its_header_has_none(keep: int) -> None:
    """Cut before its pixels start, the header cannot be read: None, for the caller to call it truncated."""
    data = _pillow(Image.new("RGB", (7, 5)), "PNG", exif=_exif(6))
    assert read_header(data[:keep]) is None


def test_a_jpeg_cut_off_before_its_frame_header_has_none() -> None:
    data = _pillow(Image.new("RGB", (7, 5)), "JPEG")
    assert read_header(data[: data.index(b"\xff\xc0")]) is None


@pytest.mark.parametrize(
    "data",
    [b"", b"GIF89a\x01\x00\x01\x00\x00\x00\x00", b"<!doctype html>", b"RIFF\0\0\0\0WEBPVP9 " + bytes(20)],
)
def test_bytes_that_are_no_accepted_image_have_none(data: bytes) -> None:
    """Not PNG, JPEG or WebP (nor a WebP of no known kind): None, for the caller to say what they look like."""
    assert read_header(data) is None


@pytest.mark.parametrize(
    ("data", "size", "mode"),
    [
        (_png_declaring(10_000, 10_000), (10_000, 10_000), "RGB"),  # over Pillow's limit: it warns
        (_png_declaring(20_000, 20_000), (20_000, 20_000), "RGB"),  # over twice it: it refuses
        (_jpeg_declaring(60_000, 50_000), (60_000, 50_000), "RGB"),
        (_webp_declaring(16_000, 16_000), (16_000, 16_000), "RGBA"),  # its reader refuses before decoding
    ],
    ids=["png over the limit", "png over twice the limit", "jpeg", "webp"],
)
def test_a_header_over_pillows_bomb_limit_is_read_at_its_size(
    data: bytes, size: tuple[int, int], mode: str
) -> None:
    """Pillow's own pixel limit (DecompressionBombWarning over it, Error over twice it) neither escapes nor
    hides the size: each caller refuses it against its own limit, naming the size."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        header = read_header(data)
    assert header is not None
    assert ((header.width, header.height), header.mode) == (size, mode)
