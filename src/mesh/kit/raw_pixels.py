"""Raw interleaved pixels (``mesh.common.v1.RawImage``) as an array: one reading of the message for every service.

The image processing service and the inference service both take raw pixels; both must refuse the same
malformed messages with the same words (every problem of the shape at once, naming the fields), and neither may
read a pixel type it does not know as another.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from mesh.common.v1 import image_pb2
from mesh.kit import errors
from mesh.kit.image_limits import check_bytes, check_pixels

CHANNELS = (1, 3, 4)
_SAMPLE_TYPES: dict[int, np.dtype[Any]] = {
    image_pb2.PIXEL_TYPE_UNSPECIFIED: np.dtype(np.uint8),
    image_pb2.PIXEL_TYPE_UINT8: np.dtype(np.uint8),
    image_pb2.PIXEL_TYPE_UINT16: np.dtype("<u2"),
}


def read_raw(
    raw: image_pb2.RawImage,
    *,
    max_pixels: int,
    max_bytes: int | None = None,
    field: str = "input.raw",
    pixels: bytes | memoryview | None = None,
) -> npt.NDArray[Any]:
    """The samples as (height, width, channels): uint8 viewing the message's bytes (read-only, not copied), or
    native uint16 for 16-bit samples (little-endian in the message). ``pixels``, when given, are the samples
    received beside the message (``mesh.kit.wire.Parted``) and read instead of ``raw.pixels``.

    InvalidData lists every problem of the shape at once; PayloadTooLarge when width x height exceeds
    ``max_pixels`` (checked before the byte count, so a huge size is told as such) or the bytes ``max_bytes``.
    """
    problems: list[tuple[str, str, str]] = []  # (field, what it must be, what it is)
    if raw.channels not in CHANNELS:
        problems.append((f"{field}.channels", "must be 1, 3 or 4", f"channels is {raw.channels}"))
    if raw.width < 1 or raw.height < 1:
        problems.append(
            (f"{field}.width", "width and height must be >= 1", f"the size is {raw.width}x{raw.height}")
        )
    dtype = _SAMPLE_TYPES.get(raw.pixel_type)
    if dtype is None:
        problems.append(
            (
                f"{field}.pixel_type",
                "must be PIXEL_TYPE_UINT8 or PIXEL_TYPE_UINT16",
                f"pixel_type is {raw.pixel_type}",
            )
        )
    if problems:
        raise errors.InvalidData(
            "invalid raw image: " + "; ".join(f"{is_} ({field_}: {must})" for field_, must, is_ in problems),
            field_violations=[errors.FieldViolation(field_, must) for field_, must, _ in problems],
        )
    assert dtype is not None  # told above
    check_pixels(raw.width, raw.height, max_pixels, field)
    if pixels is None:
        pixels = raw.pixels  # one access: each copies the bytes, and the array views this very object
    if max_bytes is not None:
        check_bytes(len(pixels), max_bytes, f"{field}.pixels")
    expected = raw.width * raw.height * raw.channels * dtype.itemsize
    if len(pixels) != expected:
        raise errors.InvalidData(
            f"raw image {raw.width}x{raw.height}x{raw.channels} ({dtype.itemsize * 8}-bit) needs {expected} bytes,"
            f" got {len(pixels)}",
            field_violations=[errors.FieldViolation(f"{field}.pixels", f"must be {expected} bytes")],
        )
    samples: npt.NDArray[Any] = np.frombuffer(pixels, dtype=dtype).reshape(
        raw.height, raw.width, raw.channels
    )
    return samples.astype(np.uint16) if dtype.itemsize == 2 else samples
