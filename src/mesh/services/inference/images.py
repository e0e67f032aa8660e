"""Model inputs as pixels: an ``ImageInput`` (file service reference, encoded bytes or raw pixels) -> ndarray.

Decoding uses Pillow restricted to PNG, JPEG and WebP, refuses images above a pixel limit before decoding
their pixels, applies the EXIF orientation (phones store portrait photos sideways), and yields 8-bit
``HxW`` (grey), ``HxWx3`` (RGB) or ``HxWx4`` (RGBA) arrays: the strip reader's input contract.
"""

from __future__ import annotations

import io
import warnings
from typing import Protocol

import numpy as np
import numpy.typing as npt
from PIL import Image

from mesh.common.v1 import image_pb2
from mesh.kit.deadlines import call_timeout
from mesh.kit.errors import FieldViolation, PayloadTooLarge
from mesh.kit.image_bytes import empty_image, undecodable, unreadable_header
from mesh.kit.image_header import read_header
from mesh.kit.image_limits import check_pixels, too_many_pixels
from mesh.kit.jpeg_data import check_jpeg_data, decode_jpeg
from mesh.kit.orientation import exif_orientation, orient, orient_image
from mesh.kit.raw_pixels import read_raw
from mesh.services.file.client import FileClient

Pixels = npt.NDArray[np.uint8]

_ACCEPTED = ("PNG", "JPEG", "WEBP")


class ImageFetcher(Protocol):
    """Gets a stored image's encoded bytes by id."""

    async def fetch(self, image_id: str, deadline: float | None = None) -> bytes:
        """The image's bytes, within the caller's ``deadline`` (a ``time.monotonic()`` instant); raises NotFound
        (or another MeshError) when it cannot."""
        ...


class FileServiceFetcher:
    """Fetches originals from the file service, each download bounded by ``timeout`` or the caller's deadline,
    whichever comes first (a download is a stream, which the channel gives no deadline of its own)."""

    def __init__(self, client: FileClient, *, timeout: float) -> None:
        self._client = client
        self._timeout = timeout

    async def fetch(self, image_id: str, deadline: float | None = None) -> bytes:
        _, _, data = await self._client.download(image_id, timeout=call_timeout(self._timeout, deadline))
        return data


class ImageDecoder:
    """Decodes encoded and raw inputs within a pixel limit."""

    def __init__(self, *, max_pixels: int) -> None:
        self.max_pixels = max_pixels

    def decode_encoded(self, data: bytes, *, field: str = "input.encoded.data") -> Pixels:
        """PNG/JPEG/WebP bytes -> pixels; errors name ``field``, the request field that held the bytes (a
        declared format is the caller's to check, with ``image_bytes.check_declared_format``)."""
        if not data:
            raise empty_image(field)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(io.BytesIO(data), formats=list(_ACCEPTED))
        except (Image.DecompressionBombWarning, Image.DecompressionBombError):
            raise self._over_pillows_limit(data, field) from None
        except (OSError, SyntaxError, ValueError):
            # Pillow says UnidentifiedImageError (an OSError) when no format matches, and a bare OSError when
            # the header it started on is cut off ("Truncated File Read").
            raise unreadable_header(data, field) from None
        with image:
            check_pixels(image.width, image.height, self.max_pixels, field)
            if image.format == "JPEG" and image.mode in ("RGB", "L"):
                # libjpeg-turbo's strict decode: Pillow's pixels in half its time, and image data cut short
                # (its end marker put back), which Pillow decodes without an error, is refused.
                stored = decode_jpeg(data, field, grey=image.mode == "L")
                return orient(stored, exif_orientation(image))
            if image.format == "JPEG":  # CMYK: Pillow's decode and colour conversion, after the strict check
                check_jpeg_data(data, field)
            orientation = exif_orientation(image)
            try:
                image.load()
            except (OSError, ValueError, SyntaxError):
                raise undecodable(image.format or "encoded", field) from None
            return _to_pixels(orient_image(image, orientation))

    def _over_pillows_limit(self, data: bytes, field: str) -> PayloadTooLarge:
        """The refusal of an image that Pillow would not open, being over its own pixel limit: with its size,
        read from the header, as ``check_pixels`` words it. Pillow's limit counts as well as ours, the lesser
        of the two being the one that refused it."""
        limit = min(self.max_pixels, Image.MAX_IMAGE_PIXELS or self.max_pixels)
        header = read_header(data)
        if header is None:  # Pillow read a size there, so this is not expected
            return PayloadTooLarge(
                f"{field} has more than {limit} pixels, the limit",
                field_violations=[FieldViolation(field, f"at most {limit} pixels")],
            )
        return too_many_pixels(header.width, header.height, limit, field)

    def decode_raw(self, raw: image_pb2.RawImage, *, field: str = "input.raw") -> Pixels:
        """Raw interleaved pixels -> an array of the contract's shape (16-bit samples keep their top byte)."""
        samples = read_raw(raw, max_pixels=self.max_pixels, field=field)
        # 8-bit samples are copied: they view the request's immutable bytes, and a model may work in place.
        pixels = (samples >> 8).astype(np.uint8) if samples.dtype == np.uint16 else samples.copy()
        return pixels.reshape(pixels.shape[:2]) if pixels.shape[2] == 1 else pixels


def _to_pixels(image: Image.Image) -> Pixels:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I"):
        # 16-bit grey: keep the top byte (8-bit is what the reader sees).
        wide = np.asarray(image).astype(np.uint32)
        return (wide >> 8 if mode != "I" else np.clip(wide, 0, 65535) >> 8).astype(np.uint8)
    if mode in ("L", "RGB", "RGBA"):
        return np.array(image, dtype=np.uint8)
    if mode == "1":
        return np.array(image.convert("L"), dtype=np.uint8)
    has_alpha = mode in ("LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    return np.array(image.convert("RGBA" if has_alpha else "RGB"), dtype=np.uint8)
