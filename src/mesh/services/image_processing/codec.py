"""Decoding and encoding of images, with the limits checked before any pixel is decoded.

The kit's reader (``mesh.kit.image_header``, Pillow) reads only the header (format and size, against
``max_pixels``); OpenCV then decodes, because it keeps 16-bit RGB(A) PNGs that Pillow would reduce, and
libjpeg-turbo's strict decode (``mesh.kit.jpeg_data``) takes YCbCr and grey JPEGs. Pixels come
back as RGB(A), (height, width, channels), turned as the EXIF orientation says (as a viewer, the thumbnails and
the strip reader show them).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np

from mesh.kit import errors
from mesh.kit.image_bytes import empty_image, not_an_image, sniff_format, undecodable, unreadable_header
from mesh.kit.image_header import read_header
from mesh.kit.image_limits import check_bytes, check_pixels
from mesh.kit.jpeg_data import check_jpeg_data, decode_jpeg
from mesh.kit.orientation import orient
from mesh.services.image_processing.filter_math import Image, as_image


class Format(StrEnum):
    """Output formats (mirrors ``mesh.common.v1.ImageFormat``)."""

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"
    RAW = "raw"


CONTENT_TYPES = {Format.PNG: "image/png", Format.JPEG: "image/jpeg", Format.WEBP: "image/webp"}
MAX_SIDES = {Format.WEBP: 16_383, Format.JPEG: 65_500, Format.PNG: 1_000_000}
"""Widest and highest image each encoder writes: libwebp's and libjpeg's format limits, and libpng's
default user limit as OpenCV builds it. RAW has none."""


@dataclass(frozen=True)
class Limits:
    """Bounds on the images a request may carry."""

    max_pixels: int = 50_000_000
    """Largest width x height accepted (and produced)."""
    max_bytes: int = 64 * 1024 * 1024
    """Largest encoded or raw input in bytes."""


@dataclass(frozen=True)
class Header:
    """What an encoded image's header says, read before any pixel is decoded."""

    kind: str
    """PNG, JPEG or WEBP."""
    width: int
    """As a viewer shows the image (after its EXIF orientation), as :func:`decode` returns it."""
    height: int
    channels: int
    """Channels of the decoded pixels (at most: a palette PNG counts 4 whether or not it is transparent)."""
    itemsize: int
    """Bytes per sample: 2 for 16-bit PNG, else 1."""
    orientation: int

    @property
    def nbytes(self) -> int:
        """The decoded pixels' size in bytes."""
        return self.width * self.height * self.channels * self.itemsize


# The channels that decode returns, by Pillow's mode: grey and RGB as stored; grey and alpha made RGBA; a palette
# PNG counted 4 whether or not it is transparent (at most), as is a CMYK JPEG.
_DECODED_CHANNELS = {"1": 1, "L": 1, "I;16": 1, "RGB": 3}


def probe(data: bytes, limits: Limits, where: str = "input.encoded.data") -> Header:
    """The header of PNG, JPEG or WebP bytes, checked against the limits; nothing is decoded."""
    if not data:
        raise empty_image(where)
    check_bytes(len(data), limits.max_bytes, where)
    if sniff_format(data) is None:
        raise not_an_image(data, where)
    stored = read_header(data)
    if stored is None:
        raise unreadable_header(data, where)
    check_pixels(stored.width, stored.height, limits.max_pixels, where)
    # OpenCV keeps 16-bit samples, so the stored sample size is the decoded one.
    channels = _DECODED_CHANNELS.get(stored.mode, 4)
    width, height = stored.shown_size
    return Header(stored.format, width, height, channels, stored.itemsize, stored.orientation)


def decode(
    data: bytes, limits: Limits, where: str = "input.encoded.data", header: Header | None = None
) -> Image:
    """PNG, JPEG or WebP bytes to RGB(A) or grey pixels (8 or 16 bit); ``header``: :func:`probe`'s answer,
    when the caller has it already."""
    if header is None:
        header = probe(data, limits, where)
    if header.kind == "JPEG" and header.channels in (1, 3):
        return orient(_decode_jpeg(data, header, where), header.orientation)
    if header.kind == "JPEG":  # OpenCV decodes image data cut short (its end marker put back) with no error
        check_jpeg_data(data, where)
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise undecodable(header.kind, where)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise errors.InvalidData(
            f"{header.kind} samples of type {pixels.dtype} are not supported (8 or 16 bit only)",
            field_violations=[errors.FieldViolation(where, "must hold 8- or 16-bit samples")],
        )
    image = as_image(pixels)
    channels = image.shape[2]
    if channels == 3:
        image = as_image(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    elif channels == 4:
        image = as_image(cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA))
    elif channels == 2:
        image = np.ascontiguousarray(image[:, :, [0, 0, 0, 1]])
    # OpenCV's IMREAD_UNCHANGED keeps the stored orientation; a phone's portrait photo would come out sideways.
    return orient(image, header.orientation)


def _decode_jpeg(data: bytes, header: Header, where: str) -> Image:
    """A YCbCr or grey JPEG's pixels by libjpeg-turbo's strict decode: OpenCV's pixels to the last bit (both
    libjpeg-turbo, the same transform and upsampling; tested on every chroma subsampling, progressive and
    restart-marker files), in one pass that also refuses image data cut short, where OpenCV needed the strict
    check first and then a decode of its own (about twice the time on a 1080p photo)."""
    try:
        return as_image(decode_jpeg(data, where, grey=header.channels == 1))
    except ValueError:  # a header libjpeg cannot read, though Pillow read it: what OpenCV says of it
        raise undecodable(header.kind, where) from None


def raw_samples(image: Image) -> memoryview:
    """Interleaved samples, little-endian, as a byte view: of the image's own memory where it is contiguous
    (an untouched raw input still views the request's bytes, a filter's output its array), else of a copy."""
    ordered = np.ascontiguousarray(image, dtype="<u2" if image.dtype == np.uint16 else image.dtype)
    return ordered.data.cast("B")


def encoded_channels(channels: int, fmt: Format) -> int:
    """The channels an image of ``channels`` has once encoded as ``fmt``: JPEG drops alpha, and WebP has no
    grey mode (a grey image is stored, and decodes, as RGB)."""
    if fmt is Format.JPEG and channels == 4:
        return 3
    if fmt is Format.WEBP and channels == 1:
        return 3
    return channels


def check_encodable(width: int, height: int, fmt: Format, where: str = "output.format") -> None:
    """INVALID_ARGUMENT naming ``where`` when ``fmt`` cannot hold an image of this size."""
    side = max(width, height)
    limit = MAX_SIDES.get(fmt)
    if limit is None or side <= limit:
        return
    fitting = [f.name for f in Format if f not in MAX_SIDES or side <= MAX_SIDES[f]]
    description = (
        f"{fmt.name} images are at most {limit} pixels wide and high, this one is {width}x{height}: "
        f"ask for one of {', '.join(fitting)}, or resize it to at most {limit} pixels a side"
    )
    raise errors.InvalidArgument(
        f"{where}: {description}", field_violations=[errors.FieldViolation(where, description)]
    )


def encode(image: Image, fmt: Format, quality: int = 90, where: str = "output.format") -> bytes:
    """PNG keeps 16 bits; JPEG and WebP are 8-bit (16-bit images are reduced). An image larger than the
    format allows is INVALID_ARGUMENT naming ``where``."""
    if fmt is Format.RAW:
        return bytes(raw_samples(image))
    check_encodable(image.shape[1], image.shape[0], fmt, where)
    channels = image.shape[2]
    pixels = image
    if fmt is not Format.PNG and image.dtype == np.uint16:
        pixels = (image >> 8).astype(np.uint8)
    if channels == 3:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    elif channels == 4:
        if fmt is Format.JPEG:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGR)
        else:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_RGBA2BGRA)
    if fmt is Format.PNG:
        ok, buffer = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    elif fmt is Format.JPEG:
        ok, buffer = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
    else:
        ok, buffer = cv2.imencode(".webp", pixels, [cv2.IMWRITE_WEBP_QUALITY, quality])
    if not ok:
        raise errors.Internal(f"encoding a {image.shape} image as {fmt.value} failed")
    return buffer.tobytes()
